"""One optimizer-group builder: no weight decay, layer-wise lr decay, per-name lr / wd overrides.

`build_param_groups` gives every trainable parameter a `Slot` — its layer id (timm's ``group_matcher``
through `timm_layer_ids`, or the caller's own numbering), whether it is exempt from weight decay,
its ``weight_decay`` and ``lr_scale = layer_decay ** (num_layers - layer)`` — lets the caller
override the slot by name, and returns one group per ``key(slot)``, in key order (the order fixes
the optimizer state's layout, so a resume needs the same order). Its callers:

- `a2mim.mim.model.MaskedImageModel.param_groups` (pre-training): decay / no_decay / token groups,
  the token (and the ResNet gamma) at ``token_lr_scale``;
- `a2mim.models.upernet.param_groups` (segmentation): one group per (timm layer, no decay), as
  mmseg's ``LayerDecayOptimizerConstructor``;
- `a2mim.detection.solver.param_groups` (detection): one group per (weight decay, lr scale),
  norms at ``weight_decay_norm``, ViTDet's layer numbering.

Fine-tuning keeps timm's own builder, ``timm.optim.create_optimizer_v2(model, layer_decay=...)``
(`a2mim.train.timm_recipe.build_optimizer`): it is timm's reference recipe, and it is the model
of this one (same matcher, same exponent), so it is used as is rather than re-expressed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from timm.models import group_parameters
from torch import nn

__all__ = ["Slot", "build_param_groups", "by_layer", "layer_scale", "timm_layer_ids"]


@dataclass(frozen=True)
class Slot:
    """Where one parameter goes: ``name`` labels its group (``decay`` / ``no_decay`` unless an
    override names it)."""

    layer: int
    no_decay: bool
    weight_decay: float
    lr_scale: float
    name: str


def timm_layer_ids(model: nn.Module) -> dict[str, int]:
    """timm's layer id of each parameter of ``model`` (``group_matcher(coarse=False)`` through
    ``group_parameters``; a ViT: embeddings 0, block ``i`` -> ``i + 1``); {} for a model
    without a ``group_matcher``."""
    if not hasattr(model, "group_matcher"):
        return {}
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def layer_scale(layer: int, num_layers: int, layer_decay: float | None) -> float:
    """``layer_decay ** (num_layers - layer)``; 1 without layer decay."""
    return 1.0 if layer_decay is None else layer_decay ** (num_layers - layer)


def by_layer(slot: Slot) -> tuple:
    """The default group key: one group per (layer, no decay), decayed first in a layer."""
    return (slot.layer, slot.no_decay)


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    no_decay: Callable[[str, nn.Parameter], bool],
    *,
    layer_of: Callable[[str], int] | None = None,
    num_layers: int = 0,
    layer_decay: float | None = None,
    overrides: Callable[[str], dict[str, Any]] | None = None,
    key: Callable[[Slot], tuple | int] = by_layer,
    label: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer groups ``{"params", "weight_decay", "lr_scale"}`` (+ ``"name"`` with ``label``)
    over the trainable ``named_params``.

    A parameter is on layer ``layer_of(name)`` when there is layer decay (``num_layers``, the top,
    otherwise); ``no_decay(name, param)`` gives it weight decay 0; ``overrides(name)`` may replace
    any `Slot` field (``weight_decay``, ``lr_scale``, ``name``, ...). Parameters with equal
    ``key(slot)`` share a group (the first one's settings); groups come in key order.
    """
    groups: dict[Any, dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        layer = num_layers if layer_of is None or layer_decay is None else layer_of(name)
        off = no_decay(name, param)
        slot = Slot(
            layer=layer,
            no_decay=off,
            weight_decay=0.0 if off else weight_decay,
            lr_scale=layer_scale(layer, num_layers, layer_decay),
            name="no_decay" if off else "decay",
        )
        if overrides is not None:
            slot = dataclasses.replace(slot, **overrides(name))
        group = groups.setdefault(
            key(slot),
            {"params": [], "weight_decay": slot.weight_decay, "lr_scale": slot.lr_scale}
            | ({"name": slot.name} if label else {}),
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]
