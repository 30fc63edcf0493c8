"""timm's fine-tuning recipe (as its ``train.py``): Mixup / CutMix and loss settings, the optimizer
with layer-wise lr decay (``create_optimizer_v2``) and the loss it picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

from a2mim.config import EpochWarmupCosine, bounded


@dataclass(frozen=True)
class MixupConfig:
    """timm ``Mixup``; off when both alphas are 0. ``mode: batch`` needs an even batch."""

    mixup_alpha: float = bounded(0.0, ge=0)
    cutmix_alpha: float = bounded(0.0, ge=0)
    prob: float = bounded(1.0, ge=0, le=1)
    switch_prob: float = bounded(0.5, ge=0, le=1)
    mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class LossConfig:
    """``ce``: cross-entropy (label smoothing ``smoothing``; soft targets under Mixup, where the
    smoothing goes into the mixed targets). ``bce``: timm ``BinaryCrossEntropy`` (RSB), with
    an optional ``bce_target_thresh`` that binarises the (mixed) targets."""

    kind: Literal["ce", "bce"] = "ce"
    smoothing: float = bounded(0.0, ge=0, lt=1)
    bce_target_thresh: float | None = bounded(None, ge=0, le=1)


@dataclass(frozen=True)
class FinetuneOptimConfig(EpochWarmupCosine):
    """A timm optimizer (``opt``: lamb, adamw, sgd, ... any ``timm.optim.list_optimizers()``
    name) built by ``create_optimizer_v2`` (no weight decay on biases, norms and the model's
    ``no_weight_decay()`` set; ``layer_decay`` gives timm's layer-wise lr decay groups);
    warm-up then per-iteration cosine."""

    opt: str = "lamb"
    weight_decay: float = bounded(0.02, ge=0)
    betas: tuple[float, float] | None = bounded(None, ge=0, lt=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    warmup_epochs: float = bounded(5.0, ge=0)
    warmup_lr: float = bounded(1e-6, ge=0)
    min_lr: float = bounded(1e-6, ge=0)


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over ``model``'s parameter groups (weight-decay split, and layer-wise
    lr decay groups carrying ``lr_scale`` when ``cfg.layer_decay`` is set; the scheduler
    multiplies each group's lr by its ``lr_scale``)."""
    extra: dict[str, Any] = {}
    if cfg.betas is not None:
        extra["betas"] = cfg.betas
    return create_optimizer_v2(
        model,
        opt=cfg.opt.lower(),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        layer_decay=cfg.layer_decay,
        **extra,
    )


def build_loss(cfg: LossConfig, mixup_active: bool) -> nn.Module:
    """The training loss, as timm's ``train.py`` picks it (targets are class indices without
    Mixup and dense mixed targets with it)."""
    if cfg.kind == "bce":
        smoothing = 0.0 if mixup_active else cfg.smoothing  # Mixup already smoothed the targets
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=cfg.bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()
