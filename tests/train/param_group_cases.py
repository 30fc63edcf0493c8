"""The models and settings whose optimizer groups `test_param_groups` pins (captured from the
four builders before they shared `a2mim.train.param_groups`, commit 2d20777)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from a2mim.detection.spec import DetectorSpec, Input
from a2mim.mim.model import MaskedImageModel
from a2mim.mim.presets import get_preset
from a2mim.models.upernet import build_upernet
from a2mim.models.upernet import param_groups as upernet_groups

SMALL_REF = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _mim(preset: str, **change) -> Callable[[], tuple[nn.Module, list[dict]]]:
    def build():
        cfg = get_preset(preset)
        if "depth" in cfg.backbone_kwargs:  # the reference ViTs: two small blocks
            change.setdefault("backbone_kwargs", {**cfg.backbone_kwargs, **SMALL_REF})
        model = MaskedImageModel(dataclasses.replace(cfg, **change))
        return model, model.param_groups(0.05)

    return build


def _upernet(name: str, layer_decay: float | None, **kwargs) -> Callable:
    def build():
        model = build_upernet(name, 5, 64, kwargs, channels=16, aux_channels=8)
        return model, upernet_groups(model, 0.05, layer_decay)

    return build


def _detect(spec: dict, **solver) -> Callable:
    def build():
        from a2mim.detection.solver import SolverConfig, param_groups, vit_depth_of
        from a2mim.detection.torchvision_backend import TorchvisionMaskRCNN

        model = TorchvisionMaskRCNN(
            DetectorSpec(**spec), Input(max_size_train=96, max_size_test=96), 3
        )
        cfg = SolverConfig(**solver)
        return model, param_groups(model, cfg, vit_depth_of(model))

    return build


VIT_DET = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"depth": 3},
    "img_size": 64,
    "arch": "sfp",
    "window_size": 2,
    "rel_pos_bias": True,
    "anchor_sizes": (16, 32, 64, 128, 256),
}
R50_C4 = {"backbone": "resnet50", "arch": "c4", "norm": "frozen_bn", "img_size": 64}
BEIT = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 64}

CASES: dict[str, Callable[[], tuple[nn.Module, list[dict]]]] = {
    "mim_resnet50": _mim("a2mim_resnet50"),
    "mim_resnet50_gamma_decay": _mim("a2mim_resnet50", gamma_group="decay"),
    "mim_resnet18": _mim("a2mim_resnet18"),
    "mim_simmim_resnet18": _mim("simmim_resnet18"),
    "mim_vit_tiny": _mim("a2mim_vit_tiny"),
    "mim_ref_vit_small": _mim("a2mim_vit_small", img_size=64),
    "mim_ref_vit_small_lr_scale": _mim("a2mim_vit_small", img_size=64, token_lr_scale=0.5),
    "mim_simmim_vit_small_plain": _mim("simmim_vit_small_plain", img_size=64),
    "upernet_resnet50": _upernet("resnet50", None),
    "upernet_vit_tiny": _upernet("vit_tiny_patch16_224", None, depth=4),
    "upernet_vit_tiny_ld": _upernet("vit_tiny_patch16_224", 0.65, depth=4),
    "upernet_vit_tiny_ld1": _upernet("vit_tiny_patch16_224", 1.0, depth=4),
    "upernet_beit_ld": _upernet("beit_base_patch16_224", 0.65, **BEIT),
    "detect_r50_c4": _detect(R50_C4),
    "detect_r50_c4_norm_wd": _detect(R50_C4, weight_decay_norm=1e-5, weight_decay=0.1),
    "detect_r50_fpn_bn_norm_wd": _detect(
        {**R50_C4, "arch": "fpn", "norm": "bn"}, weight_decay_norm=1e-5, weight_decay=0.1
    ),
    "detect_vit_fpn": _detect(VIT_DET, opt="adamw", weight_decay=0.1),
    "detect_vit_fpn_ld": _detect(VIT_DET, opt="adamw", weight_decay=0.1, layer_decay=0.7),
    "detect_vit_fpn_ld1": _detect(VIT_DET, opt="adamw", weight_decay=0.1, layer_decay=1.0),
}


def describe(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Each group as JSON: its parameters' names in the group's order and every other key."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        rest = {k: v for k, v in group.items() if k != "params"}
        out.append({"params": [names[id(p)] for p in group["params"]], **rest})
    return out


def capture(name: str) -> list[dict]:
    torch.manual_seed(0)
    return describe(*CASES[name]())


if __name__ == "__main__":  # python -m tests.train.param_group_cases OUT.json
    import json
    import sys

    result = {name: capture(name) for name in CASES}
    with open(sys.argv[1], "w") as fh:
        json.dump(result, fh, indent=0)
