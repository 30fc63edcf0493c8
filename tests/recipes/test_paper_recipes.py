"""The paper's fine-tune and probe runs resolve, and reference-ViT encoders load into them.

Every finetune / linprobe run of workflow/config/paper.yaml builds a valid config from its
recipe and ``set``; the encoder a reference-ViT preset pre-trains (``encoder.pt``) loads strictly
into the ViT fine-tuning and probing recipes that follow it (only the final norm is exchanged
for ``fc_norm`` under average pooling, as the reference's ``final_norm=False``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from a2mim import recipes
from a2mim.backbones import create_backbone
from a2mim.command import apply_set
from a2mim.config import load_yaml
from a2mim.mim import get_preset
from a2mim.stages import finetune, linprobe
from a2mim.train.engine import accumulation
from a2mim.workflow import Matrix

ROOT = Path(__file__).resolve().parents[2]
PAPER = Matrix(load_yaml(ROOT / "workflow/config/paper.yaml"))
LOADERS = {"finetune": finetune.load_config, "linprobe": linprobe.load_config}


def resolved(stage: str, spec: dict):
    data = load_yaml(recipes.resolve(stage, spec["recipe"]))
    for key, value in (spec.get("set") or {}).items():
        apply_set(data, f"{key}={json.dumps(value)}")
    return LOADERS[stage](data, f"{stage}/{spec['recipe']}")


@pytest.mark.parametrize(
    "stage,name", [(s, n) for s in LOADERS for n in sorted(PAPER.runs(s))], ids="/".join
)
def test_paper_run_config_resolves(stage, name):
    cfg = resolved(stage, PAPER.runs(stage)[name])
    assert cfg.scale == "paper"
    # The paper's global batch whatever the GPUs: set, and reachable on the run's resources.
    res = PAPER.resources(stage, name)
    world = res.nodes * res.tasks_per_node
    assert cfg.global_batch is not None
    assert accumulation(cfg, world) * world * cfg.batch_size == cfg.global_batch


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """``encoder.pt`` files of reference-ViT presets, made once per module."""
    made: dict[tuple, Path] = {}

    def get(preset: str, img_size: int | None = None) -> Path:
        if (preset, img_size) not in made:
            made[preset, img_size] = _encoder_pt(tmp_path_factory.mktemp(preset), preset, img_size)
        return made[preset, img_size]

    return get


def _encoder_pt(tmp_path: Path, preset: str, img_size: int | None = None) -> Path:
    mim = get_preset(preset)
    size = img_size or mim.img_size
    torch.manual_seed(0)
    model = create_backbone(mim.backbone, img_size=size, **mim.backbone_kwargs).model
    meta = {
        "stage": "pretrain",
        "backbone": mim.backbone,
        "backbone_kwargs": dict(mim.backbone_kwargs),
        "img_size": size,
    }
    path = tmp_path / f"{preset}.pt"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


@pytest.mark.parametrize(
    "preset,recipe,img_size",
    [
        ("a2mim_vit_base", "vit_deit", None),
        ("a2mim_vit_small", "vit_small", None),
        ("a2mim_deit_small", "in100_deit_small", 192),
    ],
)
def test_reference_vit_encoder_loads_strictly_into_its_finetune_recipe(
    encoders, preset, recipe, img_size
):
    cfg = finetune.load_config(load_yaml(recipes.resolve("finetune", recipe)))
    cfg = dataclasses.replace(cfg, init=str(encoders(preset, img_size)))
    model, report = finetune.build_model(cfg, num_classes=10)
    assert type(model).__name__ == "Beit"
    assert report["dropped"] == ["norm.bias", "norm.weight"]  # replaced by fc_norm (avg pool)
    assert sorted(report["head_init"]) == [
        "fc_norm.bias",
        "fc_norm.weight",
        "head.bias",
        "head.weight",
    ]


def test_reference_vit_encoder_loads_strictly_into_the_vit_probe(encoders):
    cfg = linprobe.load_config(load_yaml(recipes.resolve("linprobe", "vit")))
    cfg = dataclasses.replace(cfg, init=str(encoders("a2mim_vit_base")))
    probe, report = linprobe.build_probe(cfg, num_classes=10)
    assert report["loaded"] == len(probe.backbone.state_dict()) and not report["dropped"]
