"""Optimizer and per-iteration learning-rate schedules (timm schedulers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

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


# torch's optimizers with a fused kernel on the CPU and on CUDA: one pass over each parameter
# instead of one per operation (AdamW on ResNet-18's 11.7 M parameters, one CPU thread: 10.9 ms
# a step fused, 34.8 for-each, 53.8 per tensor, torch's CPU default; on CUDA torch's default is
# for-each). The same update as the reference code's AdamW, to rounding (a fused kernel orders
# its floating-point operations differently); timm's own optimizers (LAMB) have no such kernel.
# A2MIM_FUSED_OPTIM=0 in the environment restores torch's default kernels (a bit-level comparison
# with the reference code or with runs made before 2026-12-03); like the kernels torch picks on
# its own, the choice is not part of the config hash.
FUSED_OPTIMIZERS = ("adam", "adamw")
FUSED_ENV = "A2MIM_FUSED_OPTIM"


def fused_kwargs(opt: str) -> dict[str, bool]:
    """``{"fused": True}`` for an optimizer of `FUSED_OPTIMIZERS` (by timm name), else ``{}``
    (also when ``A2MIM_FUSED_OPTIM=0``)."""
    if os.environ.get(FUSED_ENV, "1") == "0":
        return {}
    return {"fused": True} if opt.lower() in FUSED_OPTIMIZERS else {}


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.base_lr * global_batch / cfg.lr_batch_divisor


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW (fused: `FUSED_OPTIMIZERS`) over groups that carry their own ``weight_decay`` and
    ``lr_scale``.

    Every group starts at the base ``lr``: the timm scheduler (``build_scheduler``) takes each
    group's initial lr as its base and applies ``lr_scale`` itself, so scaling here too would
    apply it twice.
    """
    groups = [{**g, "lr": lr} for g in param_groups if g["params"]]
    return torch.optim.AdamW(
        groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused_kwargs("adamw")
    )


def check_step_epochs(cfg: OptimConfig, epochs: float) -> None:
    """A ``ConfigError`` naming the fix when a step milestone is not inside the run's epochs
    (the lr would never decay there: an 800-epoch step recipe run for 300 epochs)."""
    if cfg.schedule != "step":
        return
    late = [e for e in cfg.step_epochs if not 0 < e < epochs]
    if late:
        raise ConfigError(
            f"optim.step_epochs {list(cfg.step_epochs)}: milestone(s) {late} are not inside the "
            f"{epochs:g} training epochs, so the lr would never decay there; set "
            f"optim.step_epochs to epochs in (0, {epochs:g}) (e.g. --set "
            f"'optim.step_epochs=[{max(1, int(epochs * 7 / 8))}]', the reference's 700/800) or use "
            f"optim.schedule: cosine"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> Scheduler:
    """A timm scheduler stepped per iteration with ``step_update(step)``; honours ``lr_scale``.

    The lr at iteration ``t`` follows the reference configs' mmcv hooks:

    * ``cosine`` (OpenMixup ``StepFixCosineAnnealing``, per iteration): linear warm-up from
      ``warmup_lr`` to the peak over the warm-up iterations ``W``, then
      ``min_lr + (peak - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` (the warm-up is a
      prefix: the cosine runs over the ``T - W`` iterations after it).
    * ``step`` (mmcv ``step`` policy, by epoch, warm-up per iteration): linear warm-up, then
      ``peak * step_gamma ** (number of step_epochs <= epoch)``; the warm-up is *not* a prefix,
      so the step lands exactly on the first iteration of the milestone epoch (timm's default
      ``warmup_prefix=True`` would shift it by the warm-up, and timm applies a milestone one
      iteration early). A milestone at or past the last epoch would never decay
      the lr: that is a ``ConfigError``.
    """
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
    check_step_epochs(cfg, total_steps / steps_per_epoch)
    return MultiStepLRScheduler(
        optimizer,
        # timm applies milestone m at step m - 1 (it compares t + 1): +1 puts the decay on the
        # first iteration of the milestone epoch, where mmcv's by-epoch step puts it.
        decay_t=[e * steps_per_epoch + 1 for e in cfg.step_epochs],
        decay_rate=cfg.step_gamma,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def build_epoch_scheduler(
    optimizer: torch.optim.Optimizer, optim: Any, total_steps: int, steps_per_epoch: int
) -> Scheduler:
    """The scheduler of an :class:`a2mim.config.EpochWarmupCosine` (finetune, linprobe: one
    function for both): its warm-up, cosine or step keys through :func:`build_scheduler`."""
    sched_cfg = OptimConfig(
        warmup_epochs=optim.warmup_epochs,
        warmup_lr=optim.warmup_lr,
        min_lr=optim.min_lr,
        schedule=optim.schedule,
        step_epochs=tuple(optim.step_epochs),
        step_gamma=optim.step_gamma,
    )
    return build_scheduler(optimizer, sched_cfg, total_steps, steps_per_epoch)


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
