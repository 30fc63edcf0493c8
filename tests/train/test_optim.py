"""The optimizers the stages build: torch's fused Adam/AdamW kernel, and its switch."""

from __future__ import annotations

import torch
from torch import nn

from a2mim.detection.solver import SolverConfig
from a2mim.detection.solver import build_optimizer as detect_optimizer
from a2mim.train.optim import FUSED_ENV, OptimConfig, build_optimizer, fused_kwargs
from a2mim.train.timm_recipe import FinetuneOptimConfig
from a2mim.train.timm_recipe import build_optimizer as timm_optimizer


def test_adam_and_adamw_are_fused_unless_switched_off(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    groups = [{"params": list(model.parameters()), "weight_decay": 0.05, "lr_scale": 1.0}]
    built = {
        "pretrain": lambda: build_optimizer(groups, OptimConfig(), 1e-3),
        "finetune adamw": lambda: timm_optimizer(model, FinetuneOptimConfig(opt="adamw"), 1e-3),
        "detect adamw": lambda: detect_optimizer(model, SolverConfig(opt="adamw"), 1e-3),
    }
    for name, make in built.items():
        assert make().defaults.get("fused") is True, name
    assert not timm_optimizer(model, FinetuneOptimConfig(opt="lamb"), 1e-3).defaults.get("fused")
    assert fused_kwargs("SGD") == {}
    monkeypatch.setenv(FUSED_ENV, "0")
    for name, make in built.items():
        assert not make().defaults.get("fused"), name


def test_fused_adamw_takes_the_reference_step_to_rounding():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    results = []
    for kw in ({}, fused_kwargs("adamw")):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, **kw)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for ref, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused, weights[0] if fused.dim() == 2 else weights[1])  # it moved
