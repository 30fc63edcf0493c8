"""Backbone adapters: one module per timm family, discovered automatically.

``adapt(model)`` returns the adapter for a timm model; ``create_backbone(name, **kwargs)`` makes
the timm model (random init, no classifier) and its adapter.
"""

from __future__ import annotations

import importlib
import pkgutil

import timm
from torch import nn

from a2mim.backbones.base import BackboneAdapter, PointSpec

__all__ = ["BackboneAdapter", "PointSpec", "adapt", "adapter_classes", "create_backbone"]


def adapter_classes() -> list[type[BackboneAdapter]]:
    """Every ``BackboneAdapter`` subclass defined in this package's modules."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found, todo = [], list(BackboneAdapter.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "family" in vars(cls):  # concrete families; abstract bases define no family
            found.append(cls)
    return sorted(found, key=lambda cls: cls.family)


def adapt(model: nn.Module) -> BackboneAdapter:
    """The adapter for a timm model, chosen by the model's class."""
    classes = adapter_classes()
    for cls in classes:
        if isinstance(model, cls.model_types):
            return cls(model)
    raise TypeError(
        f"no backbone adapter for {type(model).__name__}; supported families: "
        f"{[c.family for c in classes]}. Add one module to a2mim/backbones/ (see base.py)."
    )


def create_backbone(name: str, img_size: int | None = None, **kwargs) -> BackboneAdapter:
    """Create timm model ``name`` (random init, ``num_classes=0``) wrapped in its adapter.

    ``img_size`` is passed to models that fix their input size at creation (transformers);
    models whose constructor does not take it (convolutional nets) accept any size.
    """
    if img_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(
                name, pretrained=False, num_classes=0, img_size=img_size, **kwargs
            )
            return adapt(model)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return adapt(model)
