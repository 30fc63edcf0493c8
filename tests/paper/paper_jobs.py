"""The distinct jobs of ``workflow/config/paper.yaml``, with the arguments its rules build.

`paper_matrix` reads the paper workflow config through `a2mim.workflow.Matrix` (what the
Snakefile's rules use), pointing its dataset roots at generated data and its results at a test
folder; `distinct_jobs` keeps one job per recipe x preset x init kind (runs that differ only in
what the test caps - epochs, iterations - or in their dataset name compute the same thing at
this scale), in DAG order, each downstream job's ``--init`` pointing at the representative of
its init run, as the DAG chains them.

Caps (`CAPS`): only the number of steps, the batch per step, evaluation sizes and the data
loader's worker processes change; model, image sizes, lr, schedule and warm-up stay the paper
job's (the test checks so in the run's ``resolved_config.yaml``).
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from a2mim.workflow import STAGES, Matrix, split_init

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIG = REPO / "workflow" / "config" / "paper.yaml"

# What the test overrides per stage (`--set KEY=VALUE`), and nothing else: `max_steps` (the run
# stops after that many optimizer steps, then evaluates and saves as at its end; the schedule,
# warm-up and epochs stay the paper run's), images per step (2: the fewest BatchNorm trains on;
# 1 for detection), evaluation sizes, loader workers (2 cores). figure_images: the reconstruction
# figure's images (recipes: 8), at most the 2 val images (with fewer, pretrain's _figure_batch
# raises IndexError: it indexes figure_images items before slicing to the split's length).
CAPS: dict[str, dict[str, Any]] = {
    "pretrain": {"max_steps": 1, "batch_size": 2, "data.num_workers": 0, "figure_images": 2},
    "finetune": {
        "max_steps": 1,
        "batch_size": 2,
        "data.num_workers": 0,
        "data.eval_batch_size": 2,
    },
    "linprobe": {
        "max_steps": 1,
        "batch_size": 2,
        "data.num_workers": 0,
        "data.eval_batch_size": 2,
    },
    "detect": {"max_steps": 1, "batch_size": 1, "data.num_workers": 0, "data.val_limit": 1},
    "segment": {"max_steps": 1, "batch_size": 2, "data.num_workers": 0},
}
# Keys of a paper run's `set:` that only change the run's length (runs differing only in them
# take the same code path, so they are one job here).
CAPPED_RUN_KEYS = {"epochs", "iters", "solver.max_iter"}


@dataclass
class Job:
    stage: str
    name: str  # the paper.yaml run this job represents
    same_as: list[str] = field(default_factory=list)  # runs of the same recipe x preset x init
    init: tuple[str, str] | None = None  # (stage, name) of the job whose output it starts from
    paper_argv: list[str] = field(default_factory=list)  # a2mim <stage> ... as the rule builds it
    caps: dict[str, Any] = field(default_factory=dict)  # the test's --set overrides

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def argv(self) -> list[str]:
        """The command the test runs: the rule's arguments, then the caps."""
        sets = [["--set", f"{k}={json.dumps(v)}"] for k, v in self.caps.items()]
        return self.paper_argv + [a for pair in sets for a in pair]

    @property
    def out(self) -> Path:
        return Path(self.paper_argv[self.paper_argv.index("--out") + 1])


def paper_matrix(results: Path, roots: dict[str, Path]) -> Matrix:
    """``paper.yaml`` with ``datasets.<name>.root`` from ``roots`` and results in ``results``."""
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    config = copy.deepcopy(config)
    config["results"] = str(results)
    for name, spec in config["datasets"].items():
        if name not in roots:
            raise KeyError(f"paper.yaml dataset {name!r} has no generated root in {list(roots)}")
        spec["root"] = str(roots[name])
    return Matrix(config)


def _run_data(matrix: Matrix, stage: str, name: str) -> dict[str, Any]:
    """The raw config mapping of run ``stage/name``: its recipe with its ``set:`` applied."""
    from a2mim import recipes
    from a2mim.config import load_yaml

    spec = matrix.runs(stage)[name]
    data = load_yaml(recipes.resolve(stage, spec["recipe"]))
    for key, value in (spec.get("set") or {}).items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def _caps(matrix: Matrix, stage: str, name: str) -> dict[str, Any]:
    """`CAPS` of the stage; a run that fixes its ``global_batch`` (gradient accumulation fills it
    whatever the processes) gets it capped to the images per step too, or one step would
    accumulate the paper's thousands of images."""
    caps = dict(CAPS[stage])
    if _run_data(matrix, stage, name).get("global_batch") is not None:
        caps["global_batch"] = caps["batch_size"]
    return caps


def _backbone(matrix: Matrix, stage: str, name: str) -> str:
    """What an init of run ``stage/name`` hands on: the encoder's backbone and its kwargs."""
    data = _run_data(matrix, stage, name)
    if stage == "pretrain":
        from a2mim.stages.pretrain import load_config

        mim = load_config(data, where=f"{stage}.{name}").mim_config()
        return json.dumps([mim.backbone, dict(mim.backbone_kwargs)], sort_keys=True)
    model = data.get("model", {})
    return json.dumps([model.get("backbone"), model.get("backbone_kwargs", {})], sort_keys=True)


def _dedupe_key(matrix: Matrix, stage: str, name: str) -> str:
    spec = matrix.runs(stage)[name]
    sets = {k: v for k, v in (spec.get("set") or {}).items() if k not in CAPPED_RUN_KEYS}
    init_kind: Any = None
    if spec.get("init"):
        source, run = split_init(spec["init"])
        init_kind = [source, _backbone(matrix, source, run)]
        if source == "finetune":
            init_kind.append(matrix.runs(source)[run]["recipe"])
    return json.dumps([stage, spec["recipe"], sets, init_kind], sort_keys=True)


def distinct_jobs(matrix: Matrix) -> list[Job]:
    """One job per distinct (stage, recipe, preset/overrides, init kind), in DAG order."""
    jobs: dict[str, Job] = {}
    representative: dict[tuple[str, str], tuple[str, str]] = {}
    order = ["pretrain", "finetune", "linprobe", "detect", "segment"]
    assert set(order) <= set(STAGES), "a stage left the registry"
    unknown = [s for s in STAGES if s not in order and matrix.runs(s)]
    assert not unknown, f"paper.yaml has {unknown} runs: add the stage to this test's order"
    for stage in order:
        for name, spec in matrix.runs(stage).items():
            key = _dedupe_key(matrix, stage, name)
            if key in jobs:
                jobs[key].same_as.append(name)
                representative[(stage, name)] = (jobs[key].stage, jobs[key].name)
                continue
            argv = [stage, *shlex.split(matrix.stage_args(stage, name))]
            init = None
            if spec.get("init"):
                init = representative[split_init(spec["init"])]
                weights = "encoder.pt" if init[0] == "pretrain" else "model.pt"
                argv += ["--init", f"{matrix.run_dir(*init)}/{weights}"]
            jobs[key] = Job(
                stage, name, init=init, paper_argv=argv, caps=_caps(matrix, stage, name)
            )
            representative[(stage, name)] = (stage, name)
    return list(jobs.values())
