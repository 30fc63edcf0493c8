"""Adapter for timm ResNets (``resnet18``, ``resnet50``, ...): NCHW features.

Points: ``stem`` (after the max-pool, the input of ``layer1``) and ``stage1`` .. ``stage4``
(outputs of ``layer1`` .. ``layer4``). The paper's "stage-3" of ResNet-50 is ``stage3``
(stride 16, 1024 channels, 14x14 at 224 px).
"""

from __future__ import annotations

import torch
from timm.models.resnet import ResNet
from torch import nn

from a2mim.backbones.base import PointSpec, StagedAdapter


class ResNetAdapter(StagedAdapter):
    family = "resnet"
    model_types = (ResNet,)

    def stem(self, img_bchw: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(img_bchw))))

    def stages(self) -> list[nn.Module]:
        return [self.model.layer1, self.model.layer2, self.model.layer3, self.model.layer4]

    def stage_module(self, index: int) -> str:
        return f"layer{index + 1}"

    def stem_spec(self) -> PointSpec:
        # feature_info lists the stem at ``act1``, before the max-pool; the pool's own stride
        # gives the stride of its output.
        act = self._feature_info("act1")
        stride = getattr(self.model.maxpool, "stride", 1)
        stride = int(stride[0] if isinstance(stride, tuple | list) else stride)
        return PointSpec(channels=act.channels, stride=act.stride * stride)
