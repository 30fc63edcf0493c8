"""Every paper pre-training run's learning rate equals its reference config's.

For each pretrain run of workflow/config/paper.yaml, the run's config (recipe + ``set``) is
resolved as the workflow resolves it, and the lr our scheduler gives at epoch 0, the end of the
warm-up, the middle, 10 epochs before the end and the start of the last epoch is compared with
the numbers in ``reference_lr.yaml`` (computed from the reference configs, which it names with
their commit). Also checks the global batch the lr is scaled for. Runs in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from a2mim import recipes
from a2mim.command import apply_set
from a2mim.config import load_yaml
from a2mim.stages import pretrain
from a2mim.train.engine import accumulation
from a2mim.train.optim import build_scheduler, scaled_lr
from a2mim.workflow import Matrix

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = yaml.safe_load((Path(__file__).parent / "reference_lr.yaml").read_text())["runs"]
PAPER = Matrix(load_yaml(ROOT / "workflow/config/paper.yaml"))
RUNS = PAPER.runs("pretrain")
STEPS_PER_EPOCH = 8  # the checkpoints are epoch boundaries: any length gives the same lr there


def resolved(name: str) -> pretrain.PretrainConfig:
    """The run's config as `a2mim pretrain --config <recipe> --set ...` builds it."""
    spec = RUNS[name]
    data = load_yaml(recipes.resolve("pretrain", spec["recipe"]))
    for key, value in (spec.get("set") or {}).items():
        apply_set(data, f"{key}={json.dumps(value)}")
    return pretrain.load_config(data, f"paper.yaml pretrain/{name}")


def global_batch(name: str, cfg: pretrain.PretrainConfig) -> int:
    """The run's global batch (the recipe's ``global_batch``), checked to be reachable on the
    GPUs paper.yaml gives the run (a whole number of micro-batches per step)."""
    assert cfg.global_batch is not None, f"{name}: the recipe sets no global_batch"
    res = PAPER.resources("pretrain", name)
    world = res.nodes * res.tasks_per_node
    accum = accumulation(cfg, world)
    assert accum * world * cfg.batch_size == cfg.global_batch
    return int(cfg.global_batch)


def lr_curve(cfg: pretrain.PretrainConfig, lr: float, epochs: list[int]) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [param], "lr": lr}], lr=lr)
    sched = build_scheduler(opt, cfg.optim, cfg.epochs * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    out = []
    for epoch in epochs:
        sched.step_update(epoch * STEPS_PER_EPOCH)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_every_paper_pretrain_run_has_reference_numbers():
    assert set(RUNS) == set(REFERENCE), "add the new run's reference lr to reference_lr.yaml"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_lr_schedule_equals_the_reference_config(name):
    ref = REFERENCE[name]
    cfg = resolved(name)
    assert cfg.epochs == ref["schedule"]["epochs"], ref["source"]
    batch = global_batch(name, cfg)
    assert batch == ref["global_batch"], f"{name}: {batch} images per step, reference {ref}"
    lr = scaled_lr(cfg.optim, batch)
    assert lr == pytest.approx(ref["schedule"]["lr"], rel=1e-9)
    epochs = sorted(int(e) for e in ref["lr_at_epoch"])
    expected = [float(ref["lr_at_epoch"][e]) for e in epochs]
    got = lr_curve(cfg, lr, epochs)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12), (name, epochs, ref["source"])


LINPROBE_REFERENCE = yaml.safe_load((Path(__file__).parent / "reference_lr.yaml").read_text())[
    "linprobe"
]


def test_every_paper_linprobe_recipe_has_reference_numbers():
    recipes_used = {spec["recipe"] for spec in PAPER.runs("linprobe").values()}
    assert recipes_used <= set(LINPROBE_REFERENCE), "add the recipe's lr to reference_lr.yaml"


@pytest.mark.parametrize("name", sorted(PAPER.runs("linprobe")))
def test_linprobe_lr_equals_the_reference(name):
    """The paper's linear probes (MoCo protocol) step the lr x0.1 at epochs 60 and 80 as
    their reference config, through the one scheduler the finetune and linprobe stages use."""
    from a2mim.stages import linprobe
    from a2mim.train.optim import build_epoch_scheduler

    spec = PAPER.runs("linprobe")[name]
    ref = LINPROBE_REFERENCE[spec["recipe"]]
    data = load_yaml(recipes.resolve("linprobe", spec["recipe"]))
    for key, value in (spec.get("set") or {}).items():
        apply_set(data, f"{key}={json.dumps(value)}")
    cfg = linprobe.load_config(data, f"paper.yaml linprobe/{name}")
    assert cfg.epochs == ref["schedule"]["epochs"] and cfg.global_batch == ref["global_batch"]
    assert cfg.optim.schedule == "step" and list(cfg.optim.step_epochs) == ref["schedule"]["step"]
    lr = cfg.optim.scaled_lr(cfg.global_batch)
    assert lr == pytest.approx(ref["schedule"]["lr"], rel=1e-12)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": lr}], lr=lr, momentum=0.9)
    sched = build_epoch_scheduler(opt, cfg.optim, cfg.epochs * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    epochs = sorted(int(e) for e in ref["lr_at_epoch"])
    got = []
    for epoch in epochs:
        sched.step_update(epoch * STEPS_PER_EPOCH)
        got.append(opt.param_groups[0]["lr"])
    expected = [float(ref["lr_at_epoch"][e]) for e in epochs]
    assert got == pytest.approx(expected, rel=1e-9), (name, epochs, ref["source"])
    # the last iteration before a milestone still has the old lr (the step is by epoch)
    sched.step_update(60 * STEPS_PER_EPOCH - 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"schedule": "step", "step_epochs": [60, 100]}, r"milestone\(s\) \[100\] are not inside"),
        ({"schedule": "step", "step_epochs": [80, 60]}, "must be increasing"),
        ({"schedule": "cosine", "step_epochs": [60]}, "read only by optim.schedule: step"),
    ],
)
def test_epoch_schedule_milestones_are_checked_when_the_config_loads(optim, message):
    from a2mim.config import ConfigError
    from a2mim.stages import finetune, linprobe

    for stage, recipe in ((linprobe, "moco_resnet50"), (finetune, "tiny")):
        data = load_yaml(recipes.resolve(stage.__name__.rsplit(".", 1)[1], recipe))
        data["epochs"] = 100
        data["optim"] = {**data.get("optim", {}), **optim}
        with pytest.raises(ConfigError, match=message):
            stage.load_config(data, "test")
