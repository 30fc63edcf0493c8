"""The stage registry: every stage the CLI offers, the launcher runs and the workflow wires.

One :class:`Stage` line per stage. The CLI builds its sub-commands from it, ``a2mim launch`` and
the workflow read the launcher's resource defaults (:class:`Resources`, declared once, here) and
what a stage reads and writes from it. A stage's code lives in ``a2mim/stages/<name>.py`` and
offers ``load_config(data, where) -> cfg`` and ``run(cfg, out_dir) -> metrics``; it is imported
only when the stage is used, so reading the registry imports neither torch nor a stage.
``a2mim.stages`` re-exports this module's names.

A new downstream task is that one module plus one line in :data:`STAGES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

Layout = Literal["imagefolder", "coco", "ade", "runs"]


@dataclass(frozen=True)
class Resources:
    """What one job of a stage asks the scheduler for (SLURM or the local executor).

    The defaults are the launcher's (``a2mim launch``'s options) and the workflow's; a workflow
    config's ``resources`` section overrides them per stage, and a :class:`Stage` may declare
    its own (e.g. analysis needs one task whatever the training stages use)."""

    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    timeout_min: int = 60
    signal_delay_s: int = 120  # SLURM: USR2 this long before the time limit -> save and requeue
    max_retries: int = 2  # resubmissions after a job died without a result
    max_requeues: int = 20  # SLURM: requeues at the time limit / preemption (Submitit's is 3)
    slurm_args: dict[str, str] = field(default_factory=dict)  # e.g. account, qos, constraint

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Stage:
    """One entry of the registry.

    Args:
        name: the sub-command (``a2mim <name>``) and the module ``a2mim.stages.<name>``.
        help: one line for ``a2mim --help``.
        description: the sub-command's ``--help`` text.
        output: the file a finished run writes last (what the workflow waits for).
        layout: what ``data.root`` must hold (checked before anything is submitted).
        init: whether the stage starts from an upstream checkpoint (``--init``).
        in_matrix: whether a workflow config lists runs of it under its name.
        resources: launcher defaults of this stage, below the workflow config's.
    """

    name: str
    help: str
    description: str
    output: str = "metrics.json"
    layout: Layout = "imagefolder"
    init: bool = True
    in_matrix: bool = True
    resources: Resources = Resources()

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"a2mim.stages.{self.name}")

    def load_config(self, data: dict[str, Any], where: str = "config") -> Any:
        return self.module.load_config(data, where=where)


_RESUMES = "Restarting the same command resumes from <out>/checkpoint.pt."

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "pretrain",
            "A²MIM / SimMIM pre-training",
            f"Pre-train an encoder with masked image modeling. {_RESUMES}",
            output="encoder.pt",
            init=False,
        ),
        Stage(
            "finetune",
            "classification fine-tuning (timm)",
            "Fine-tune the encoder of a pretrain run (--init <run>/encoder.pt), or train from "
            f"scratch without --init. {_RESUMES}",
        ),
        Stage(
            "linprobe",
            "linear probe on frozen features",
            "Train BatchNorm + Linear on the frozen, pooled features of a pretrain encoder "
            f"(--init <run>/encoder.pt; without it, of a random-init backbone). {_RESUMES}",
        ),
        Stage(
            "detect",
            "COCO Mask R-CNN (torchvision or detectron2 backend)",
            "Fine-tune Mask R-CNN on a COCO-format instance set from the encoder of a pretrain "
            f"run (--init <run>/encoder.pt; without it, from scratch) and report box/mask AP. "
            f"{_RESUMES}",
            layout="coco",
        ),
        Stage(
            "knn",
            "weighted k-NN accuracy of frozen features",
            "Classify the validation images by a weighted vote of their k nearest training "
            "images in the feature space of a pretrain encoder (--init <run>/encoder.pt), as "
            "DINO's k-NN evaluation.",
        ),
        Stage(
            "segment",
            "semantic segmentation (UperNet, ADE20K layout)",
            "Train UperNet on the encoder of a pretrain run (--init <run>/encoder.pt; without "
            f"it, from scratch) and report mIoU. {_RESUMES}",
            layout="ade",
        ),
        Stage(
            "analyze",
            "paper Figs. 1, 3, 5 from finished runs",
            "figure1: occlusion robustness and multi-order interactions of finetune runs; "
            "figure3: Fourier / variance of block outputs of pretrain or finetune runs; figure5: "
            "reconstructions of pretrain runs. Writes <out>/FIGURE.png/.svg/.csv and "
            "metrics.json; PATH 'random' is a random-init model (figures 1, 3).",
            layout="imagefolder",
            init=False,
            in_matrix=False,
            resources=Resources(timeout_min=120),
        ),
    )
}


def get(name: str) -> Stage:
    """The registered stage ``name``; an unknown name is a ValueError listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def matrix_stages() -> list[Stage]:
    """Stages whose runs a workflow config lists under their own name, in DAG order."""
    return [s for s in STAGES.values() if s.in_matrix]


__all__ = ["STAGES", "Layout", "Resources", "Stage", "get", "matrix_stages"]
