"""The segmentation solver: a timm optimizer over UperNet's layer-decay groups, warm-up then poly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler

from a2mim.config import OptimBase, bounded
from a2mim.models.upernet import UperNetSegmenter, param_groups
from a2mim.train.optim import fused_kwargs


@dataclass(frozen=True)
class SegmentOptimConfig(OptimBase):
    """A timm optimizer (``create_optimizer_v2``) over `a2mim.models.upernet.param_groups`;
    ``lr = base_lr * global_batch / lr_batch_divisor`` (the divisor 16 keeps mmseg's absolute
    lr at batch 16). Warm-up: ``warmup_iters`` linear from ``lr * warmup_ratio``; then poly
    ``(lr - min_lr) * (1 - t / T) ** power + min_lr`` over the remaining iterations."""

    opt: str = "adamw"
    base_lr: float = bounded(1e-4, gt=0)
    lr_batch_divisor: int = bounded(16, ge=1)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] | None = bounded((0.9, 0.999), ge=0, lt=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    warmup_iters: int = bounded(1500, ge=0)
    warmup_ratio: float = bounded(1e-6, ge=0, le=1)
    power: float = bounded(1.0, gt=0)
    min_lr: float = bounded(0.0, ge=0)


def build_optimizer(
    model: UperNetSegmenter, cfg: SegmentOptimConfig, lr: float
) -> torch.optim.Optimizer:
    """timm's optimizer over the weight-decay / layer-decay groups of `param_groups` (torch's
    fused kernel where it has one: `a2mim.train.optim.FUSED_OPTIMIZERS`)."""
    extra: dict[str, Any] = {}
    if cfg.betas is not None and cfg.opt.lower() not in ("sgd", "momentum", "nesterov"):
        extra["betas"] = cfg.betas
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return create_optimizer_v2(
        groups,
        opt=cfg.opt.lower(),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        **extra,
        **fused_kwargs(cfg.opt),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SegmentOptimConfig, total_steps: int, lr: float
) -> PolyLRScheduler:
    """Linear warm-up from ``lr * warmup_ratio`` over ``warmup_iters``, then poly decay to
    ``min_lr`` at ``total_steps`` (stepped per iteration with ``step_update``; honours each
    group's ``lr_scale``)."""
    return PolyLRScheduler(
        optimizer,
        t_initial=max(total_steps - cfg.warmup_iters, 1),  # iters 0: never stepped
        power=cfg.power,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_iters,
        warmup_lr_init=lr * cfg.warmup_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
