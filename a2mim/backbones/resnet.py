"""Adapter for timm ResNets (``resnet18``, ``resnet50``, ...): NCHW features.

Points: ``stem`` (after the max-pool, the input of ``layer1``) and ``stage1`` .. ``stage4``
(outputs of ``layer1`` .. ``layer4``). The paper's "stage-3" of ResNet-50 is ``stage3``
(stride 16, 1024 channels, 14x14 at 224 px).
"""

from __future__ import annotations

import torch
from timm.models.resnet import ResNet
from torch import nn

from a2mim.backbones.base import BackboneAdapter, Edit, PointSpec

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetAdapter(BackboneAdapter):
    family = "resnet"
    model_types = (ResNet,)

    @property
    def points(self) -> tuple[str, ...]:
        return ("stem", *tuple(f"stage{i}" for i in range(1, 5)))

    @property
    def first_point(self) -> str:
        return "stem"

    def point_spec(self, point: str) -> PointSpec:
        self.check_point(point)
        if point == "stem":
            # feature_info lists the stem at ``act1`` (before the max-pool); the pool's own
            # stride gives the stride of its output.
            act = self._feature_info("act1")
            pool = self.model.maxpool
            pool_stride = _stride_of(pool)
            return PointSpec(channels=act.channels, stride=act.stride * pool_stride)
        return self._feature_info(_STAGES[int(point[-1]) - 1])

    def final_spec(self) -> PointSpec:
        return self._feature_info(_STAGES[-1])

    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(img_bchw))))
        if point == "stem" and edit is not None:
            x = edit(x)
        for i, name in enumerate(_STAGES, start=1):
            x = getattr(m, name)(x)
            if point == f"stage{i}" and edit is not None:
                x = edit(x)
        return x

    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        return mask_bhw[:, None]

    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        return vec_c.view(1, -1, 1, 1)


def _stride_of(module: nn.Module) -> int:
    """The spatial stride of a pooling module (1 for Identity)."""
    stride = getattr(module, "stride", 1)
    return int(stride[0] if isinstance(stride, tuple | list) else stride)
