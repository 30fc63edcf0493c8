"""Optimizer and per-iteration learning-rate schedules (timm schedulers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from a2mim.config import ConfigError, bounded


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up and a per-iteration cosine or step schedule.

    ``lr = base_lr * global_batch / lr_batch_divisor`` (linear scaling; the reference A²MIM
    pre-training configs use base 3e-4 per 512 images for ResNet-50, i.e. 1.2e-3 at 2048).
    """

    base_lr: float = bounded(3e-4, gt=0)
    lr_batch_divisor: int = bounded(512, ge=1)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    warmup_epochs: float = bounded(10.0, ge=0)
    warmup_lr: float = bounded(1e-6, ge=0)
    min_lr: float = bounded(1e-5, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    step_epochs: tuple[int, ...] = bounded((), ge=1)
    step_gamma: float = bounded(0.1, gt=0)
    grad_clip: float | None = bounded(None, gt=0)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.base_lr * global_batch / cfg.lr_batch_divisor


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over groups that carry their own ``weight_decay`` and ``lr_scale``.

    Every group starts at the base ``lr``: the timm scheduler (``build_scheduler``) takes each
    group's initial lr as its base and applies ``lr_scale`` itself, so scaling here too would
    apply it twice.
    """
    groups = [{**g, "lr": lr} for g in param_groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> Scheduler:
    """A timm scheduler stepped per iteration with ``step_update(step)``; honours ``lr_scale``."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - warmup),
            lr_min=cfg.min_lr,
            warmup_t=warmup,
            warmup_lr_init=cfg.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    return MultiStepLRScheduler(
        optimizer,
        decay_t=[e * steps_per_epoch for e in cfg.step_epochs],
        decay_rate=cfg.step_gamma,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=False,
    )


def check_timm_optim(opt: str, layer_decay: float | None, where: str) -> None:
    """Refuse an optimizer name timm does not know (with close matches) and a layer decay
    outside (0, 1]: the checks of every stage that builds its optimizer through timm."""
    import difflib

    from timm.optim import list_optimizers

    if opt.lower() not in list_optimizers():
        close = difflib.get_close_matches(opt.lower(), list_optimizers(), n=3)
        raise ConfigError(
            f"{where}: optim.opt {opt!r} is not a timm optimizer"
            + (f" (did you mean {close}?)" if close else "")
        )
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"{where}: optim.layer_decay must be in (0, 1], got {layer_decay}")
