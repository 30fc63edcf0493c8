"""detectron2's solver for the ``detect`` stage: SGD / AdamW over weight-decay and ViT layer-decay
groups, warm-up multi-step lr.

SGD (or AdamW) with ``lr = base_lr * global_batch / lr_batch_divisor``, linear warm-up from
``warmup_factor * lr`` over ``warmup_iters``, then x ``gamma`` at each of ``steps``
(iterations); no weight decay on normalisation layers (``weight_decay_norm``), position
embeddings and relative position biases; optional layer-wise lr decay for ViTs. The learning
rate is a function of the step, so a checkpoint needs no scheduler state.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from a2mim.config import OptimBase, bounded
from a2mim.detection.backbone import vit_layer_id
from a2mim.train.optim import fused_kwargs
from a2mim.train.param_groups import build_param_groups


@dataclass(frozen=True)
class SolverConfig(OptimBase):
    """detectron2's solver (``SOLVER.*``): iterations, not epochs. ``layer_decay`` (ViT only)
    scales block ``i``'s lr by ``layer_decay ** (depth - i)`` (ViTDet / BEiT)."""

    opt: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = bounded(0.02, gt=0)
    lr_batch_divisor: int = bounded(16, ge=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = bounded(1e-4, ge=0)
    weight_decay_norm: float = bounded(0.0, ge=0)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    max_iter: int = bounded(90000, ge=0)
    steps: tuple[int, ...] = bounded((60000, 80000), ge=1)
    gamma: float = bounded(0.1, gt=0)
    warmup_iters: int = bounded(1000, ge=0)
    warmup_factor: float = bounded(0.001, ge=0, le=1)


def lr_factor(step: int, solver: SolverConfig) -> float:
    """detectron2's ``WarmupMultiStepLR`` factor at iteration ``step`` (0-based): linear
    warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, times ``gamma`` per passed step."""
    factor = solver.gamma ** bisect.bisect_right(solver.steps, step)
    if step < solver.warmup_iters:
        alpha = step / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


def _is_norm(module: nn.Module) -> bool:
    """Normalisation layers of torch, timm and detectron2 (whose LayerNorm is its own class)."""
    torch_norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    return isinstance(module, torch_norms) or "Norm" in type(module).__name__


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "relative_position_bias_table")


def param_groups(model: nn.Module, solver: SolverConfig, vit_depth: int | None) -> list[dict]:
    """Parameter groups with their ``weight_decay`` and ``lr_scale``: normalisation layers get
    ``weight_decay_norm``, embeddings and relative position biases none, the rest
    ``weight_decay``; with ``layer_decay`` (ViT of ``vit_depth`` blocks) ``lr_scale`` follows
    `a2mim.detection.backbone.vit_layer_id`."""
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    norms = {name for name, p in model.named_parameters() if id(p) in norm_ids}
    norm_decay = {"weight_decay": solver.weight_decay_norm}
    return build_param_groups(
        model.named_parameters(),
        solver.weight_decay,
        lambda name, param: name.split(".")[-1] in _NO_DECAY_NAMES,
        layer_of=None if vit_depth is None else lambda name: vit_layer_id(name, vit_depth),
        num_layers=0 if vit_depth is None else vit_depth + 1,
        layer_decay=solver.layer_decay,
        overrides=lambda name: norm_decay if name in norms else {},
        key=lambda slot: (slot.weight_decay, slot.lr_scale),
    )


def build_optimizer(
    model: nn.Module, solver: SolverConfig, lr: float, vit_depth: int | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW (fused: `a2mim.train.optim.FUSED_OPTIMIZERS`) over
    `param_groups`; each group's lr is set per step by the stage as
    ``lr * lr_scale * lr_factor(step)``."""
    groups = [{**g, "lr": lr * g["lr_scale"]} for g in param_groups(model, solver, vit_depth)]
    if solver.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=solver.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=solver.betas, **fused_kwargs("adamw"))


class WarmupMultiStep:
    """`lr_factor` as a per-iteration schedule: ``step_update(t)`` sets each group's lr to
    ``lr * lr_scale * lr_factor(t)``. A function of the step, so it has no state to save."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, solver: SolverConfig):
        self.optimizer, self.lr, self.solver = optimizer, lr, solver

    def step_update(self, step: int) -> None:
        factor = lr_factor(step, self.solver)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group["lr_scale"] * factor

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------- run


def vit_depth_of(model: nn.Module) -> int | None:
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(module, "patch_embed"):
            return len(blocks)
    return None
