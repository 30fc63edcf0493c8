"""The runs an analysis reads (``--model LABEL=PATH``): checked, described, and their models rebuilt."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from a2mim.analysis.config import RANDOM, AnalyzeConfig, metric_key
from a2mim.config import ConfigError, from_dict
from a2mim.mim import MaskedImageModel, MIMConfig
from a2mim.train import checkpoint
from a2mim.train.classify import load_classifier
from a2mim.train.encoder import create_classifier, file_sha256
from a2mim.train.rundir import read_run
from a2mim.train.sampling import mix_seed, seed_cpu

_ACCEPTED: dict[str, tuple[str, ...]] = {
    "figure1": ("finetune", "linprobe"),
    "figure3": ("pretrain", "finetune", "linprobe"),
    "figure5": ("pretrain",),
}


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs to know about one ``--model LABEL=PATH``.

    ``stage`` is the producing stage (``pretrain``, ``finetune``, ``linprobe``) or ``random``;
    ``method`` the pre-training method (``a2mim``, ``simmim``, ``scratch``, ``random``);
    ``weights`` the file the model is loaded from and ``sha256`` its digest.
    """

    label: str
    path: str
    stage: str
    method: str
    preset: str | None
    backbone: str
    backbone_kwargs: dict[str, Any]
    img_size: int
    crop_pct: float
    num_classes: int | None
    classes: tuple[str, ...] | None
    global_pool: str | None
    weights: str | None
    sha256: str | None

    @property
    def key(self) -> str:
        """The label as a metric-key prefix and folder name (:func:`metric_key`)."""
        return metric_key(self.label)

    @property
    def legend(self) -> str:
        """Method and checkpoint: ``A2MIM: a2mim_resnet18 + finetune [ft_a2mim]``."""
        if self.stage == RANDOM:
            return f"{self.label}: random init {self.backbone}"
        what = self.preset or {"finetune": "scratch", "linprobe": "random features"}[self.stage]
        if self.stage != "pretrain":
            what += f" + {self.stage}"
        return f"{self.label}: {what} [{Path(self.path).name}]"


def _need(figure: str) -> str:
    return {
        "figure1": "finished finetune (or linprobe) run folders holding model.pt",
        "figure3": "finished pretrain (encoder.pt) or finetune/linprobe (model.pt) run folders",
        "figure5": "finished pretrain run folders holding checkpoint.pt (decoder, mask token)",
    }[figure]


def inspect_run(label: str, path_text: str, figure: str, crop_pct: float | None) -> RunInfo:
    """Check that ``path_text`` is a finished run that ``figure`` can use, and describe it.

    Raises FileNotFoundError for a missing folder and ConfigError for a run of the wrong kind
    or an unfinished one; both messages name the label, the folder and what to pass instead.
    """
    where = f"--model {label}={path_text}"
    path = Path(path_text)
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such run folder; {figure} takes {_need(figure)}")
    if not path.is_dir():
        raise ConfigError(f"{where}: is a file; pass the run folder that holds it ({path.parent})")
    if not (path / "resolved_config.yaml").is_file():
        raise ConfigError(
            f"{where}: not a run folder of an a2mim stage (no resolved_config.yaml); "
            f"{figure} takes {_need(figure)}"
        )
    record = read_run(path)
    stage = record.stage
    if stage not in _ACCEPTED[figure]:
        hint = ""
        if stage == "pretrain" and figure == "figure1":
            hint = f"; fine-tune it first: a2mim finetune --config ... --init {path}/encoder.pt"
        raise ConfigError(f"{where}: is a {stage} run; {figure} takes {_need(figure)}{hint}")
    weights = record.weights
    if stage == "pretrain" and figure == "figure5":
        weights = path / "checkpoint.pt"
    if not weights.is_file() or not record.finished:
        raise ConfigError(
            f"{where}: the {stage} run has not finished ({weights.name} or metrics.json is "
            "missing); finish it (the same command resumes it) and analyse it then"
        )
    preset = record.preset
    if stage == "pretrain":
        mim = record.derived["mim"]
        return RunInfo(
            label=label,
            path=str(path),
            stage=stage,
            method=preset.split("_")[0],
            preset=preset,
            backbone=mim["backbone"],
            backbone_kwargs=dict(mim["backbone_kwargs"]),
            img_size=int(mim["img_size"]),
            crop_pct=1.0 if crop_pct is None else crop_pct,
            num_classes=None,
            classes=None,
            global_pool=None,
            weights=str(weights),
            sha256=file_sha256(weights),
        )
    meta = checkpoint.load(weights)["meta"]
    return RunInfo(
        label=label,
        path=str(path),
        stage=stage,
        method=preset.split("_")[0] if preset else "scratch",
        preset=preset,
        backbone=meta["backbone"],
        backbone_kwargs=dict(meta["backbone_kwargs"]),
        img_size=int(meta.get("test_img_size") or meta["img_size"]),
        crop_pct=float(meta["test_crop_pct"]) if crop_pct is None else crop_pct,
        num_classes=int(meta["num_classes"]),
        classes=tuple(meta["classes"]),
        global_pool=meta.get("global_pool"),
        weights=str(weights),
        sha256=file_sha256(weights),
    )


def inspect_all(cfg: AnalyzeConfig) -> list[RunInfo]:
    """Every model of ``cfg``, ``random`` ones shaped like the first real run."""
    real = {
        ref.label: inspect_run(ref.label, ref.path, cfg.figure, cfg.data.crop_pct)
        for ref in cfg.models
        if ref.path != RANDOM
    }
    template = next(iter(real.values()))
    return [
        real[ref.label]
        if ref.path != RANDOM
        else replace(
            template,
            label=ref.label,
            path=RANDOM,
            stage=RANDOM,
            method=RANDOM,
            preset=None,
            weights=None,
            sha256=None,
        )
        for ref in cfg.models
    ]


def build_classifier(info: RunInfo, seed: int) -> nn.Module:
    """The classifier of a finetune/linprobe run, or a random-init one (seeded) like it."""
    if info.stage == RANDOM:
        with torch.random.fork_rng(devices=[]):
            seed_cpu(mix_seed(seed, 5))
            model = create_classifier(
                info.backbone,
                info.num_classes or 0,
                info.img_size,
                info.backbone_kwargs,
                global_pool=info.global_pool,
            )
        return model.eval()
    return load_classifier(info.weights)[0]


def build_encoder(info: RunInfo, seed: int) -> nn.Module:
    """The network whose blocks Fig. 3 reads: a pretrain run's encoder (timm model without a
    head, loaded strictly), a classifier run's classifier, or a random-init one."""
    if info.stage != "pretrain":
        return build_classifier(info, seed)
    model = create_classifier(info.backbone, 0, info.img_size, info.backbone_kwargs)
    state = checkpoint.load(info.weights)["state_dict"]
    checkpoint.load_encoder_strict(model, state, info.weights)
    return model.eval()


def build_mim_model(info: RunInfo) -> MaskedImageModel:
    """The full masked image model of a pretrain run (encoder, mask token, decoder) as it was
    at the run's end, from its resolved ``MIMConfig`` and ``checkpoint.pt``."""
    mim = read_run(info.path).derived["mim"]
    mim_cfg = from_dict(MIMConfig, mim, f"{info.path}: derived.mim")
    model = MaskedImageModel(mim_cfg)
    model.load_state_dict(checkpoint.load(info.weights)["model"], strict=True)
    return model.eval()
