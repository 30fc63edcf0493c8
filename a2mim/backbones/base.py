"""The backbone adapter contract.

An adapter wraps an unmodified timm model and tells the A²MIM algorithm four things, so that the
algorithm never needs to know a backbone's name:

1. the named *points* of the forward pass where a mask token may be applied, in forward order,
   and each point's channels and stride (read from timm's ``feature_info`` and module attributes,
   never from a hand-written table);
2. how to run ``forward_features`` with an ``edit`` function applied to the feature map at one
   point (with no edit, the output is exactly timm's own ``forward_features``);
3. the native layout of the features at each point, so that a cell mask and a per-channel
   parameter can be broadcast onto them without copies (``mask_at`` and ``channel_view``);
4. the final encoder feature map as ``(B, C, h, w)`` plus the final channels and stride, and the
   parameter names that get no weight decay.

Adding a backbone family means one new module in this package defining one ``BackboneAdapter``
subclass (it is discovered automatically) and one line in ``tests/backbones/test_contract.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PointSpec:
    """Channels and stride (input pixels per feature cell) of a feature map at a named point."""

    channels: int
    stride: int


class BackboneAdapter(ABC):
    """Base class of all adapters. Subclasses set ``family`` and ``model_types``."""

    #: A short family name used in messages, e.g. ``"resnet"``.
    family: ClassVar[str]
    #: The timm model classes this adapter understands (matched with ``isinstance``).
    model_types: ClassVar[tuple[type[nn.Module], ...]]

    def __init__(self, model: nn.Module):
        if not isinstance(model, self.model_types):
            raise TypeError(
                f"{type(self).__name__} adapts {[t.__name__ for t in self.model_types]}, "
                f"got {type(model).__name__}"
            )
        self.model = model

    # ---- points ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def points(self) -> tuple[str, ...]:
        """Valid point names in forward order."""

    @property
    @abstractmethod
    def first_point(self) -> str:
        """The point right after the stem / patch embedding (SimMIM's "replace" point)."""

    @abstractmethod
    def point_spec(self, point: str) -> PointSpec:
        """Channels and stride of the features at ``point``."""

    @abstractmethod
    def final_spec(self) -> PointSpec:
        """Channels and stride of the final encoder feature map."""

    def check_point(self, point: str) -> None:
        if point not in self.points:
            raise ValueError(
                f"unknown token point {point!r} for a {self.family} backbone; "
                f"valid points are {list(self.points)}"
            )

    # ---- forward --------------------------------------------------------------------------
    @abstractmethod
    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        """timm's ``forward_features`` with ``edit`` applied to the features at ``point``.

        The result is in the model's native layout (what timm's ``forward_features`` returns).
        """

    @abstractmethod
    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        """The final features as a ``(B, C, h, w)`` map (prefix tokens dropped for ViTs)."""

    # ---- layout ---------------------------------------------------------------------------
    @abstractmethod
    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        """A bool mask broadcastable onto the native features at ``point``.

        ``mask_bhw`` is already at the point's resolution (h = H / stride). The result has a
        singleton channel dimension; for token layouts prefix tokens (cls, registers) are False.
        """

    @abstractmethod
    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        """A view of a per-channel vector ``(C,)`` broadcastable onto the features at ``point``."""

    # ---- optimisation -----------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names (relative to the timm model) of parameters that get no weight decay.

        Norm weights and all biases (every parameter with fewer than 2 dimensions), plus what the
        model itself declares through timm's ``no_weight_decay()`` (position/cls embeddings,
        relative position bias tables).
        """
        declared = set(getattr(self.model, "no_weight_decay", lambda: set())())
        names = set()
        for name, param in self.model.named_parameters():
            if param.ndim <= 1 or name in declared or name.split(".")[-1] in declared:
                names.add(name)
        return names

    # ---- helpers for subclasses ----------------------------------------------------------------
    def _feature_info(self, module: str) -> PointSpec:
        for info in self.model.feature_info:
            if info["module"] == module:
                return PointSpec(channels=int(info["num_chs"]), stride=int(info["reduction"]))
        raise KeyError(f"{module!r} is not in the model's feature_info")


class StagedAdapter(BackboneAdapter):
    """Shared contract of hierarchical backbones: a stem, then N stages.

    Points: ``stem`` (the stem's output) and ``stage1`` .. ``stageN`` (stage outputs).
    Subclasses say where the stem and stages are, the stem's spec, the ``feature_info`` module
    name of each stage, and whether features are channels-last ``(B, H, W, C)``.
    """

    #: True for ``(B, H, W, C)`` features (Swin), False for ``(B, C, H, W)``.
    channels_last: ClassVar[bool] = False

    @abstractmethod
    def stem(self, img_bchw: torch.Tensor) -> torch.Tensor:
        """The stem's output."""

    @abstractmethod
    def stages(self) -> list[nn.Module]:
        """The stage modules in forward order."""

    @abstractmethod
    def stem_spec(self) -> PointSpec:
        """Channels and stride of the stem's output (derived from module attributes)."""

    @abstractmethod
    def stage_module(self, index: int) -> str:
        """The ``feature_info`` module name of stage ``index`` (0-based)."""

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """What timm applies after the last stage in ``forward_features`` (a norm or nothing)."""
        return feats

    @property
    def points(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i}" for i in range(1, len(self.stages()) + 1)))

    @property
    def first_point(self) -> str:
        return "stem"

    def point_spec(self, point: str) -> PointSpec:
        self.check_point(point)
        if point == "stem":
            return self.stem_spec()
        return self._feature_info(self.stage_module(int(point[5:]) - 1))

    def final_spec(self) -> PointSpec:
        return self._feature_info(self.stage_module(len(self.stages()) - 1))

    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        x = self.stem(img_bchw)
        if point == "stem" and edit is not None:
            x = edit(x)
        for i, stage in enumerate(self.stages(), start=1):
            x = stage(x)
            if point == f"stage{i}" and edit is not None:
                x = edit(x)
        return self.head(x)

    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.permute(0, 3, 1, 2) if self.channels_last else feats

    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        return mask_bhw[..., None] if self.channels_last else mask_bhw[:, None]

    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        return vec_c.view(1, 1, 1, -1) if self.channels_last else vec_c.view(1, -1, 1, 1)
