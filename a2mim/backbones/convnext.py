"""Adapter for timm ConvNeXts (``convnext_atto`` .. ``convnext_base``): NCHW features.

Points: ``stem`` (the patchify stem's output) and ``stage1`` .. ``stage4`` (outputs of
``stages.0`` .. ``stages.3``).
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt
from torch import nn

from a2mim.backbones.base import PointSpec, StagedAdapter


class ConvNeXtAdapter(StagedAdapter):
    family = "convnext"
    model_types = (ConvNeXt,)

    def stem(self, img_bchw: torch.Tensor) -> torch.Tensor:
        return self.model.stem(img_bchw)

    def stages(self) -> list[nn.Module]:
        return list(self.model.stages)

    def stage_module(self, index: int) -> str:
        return f"stages.{index}"

    def stem_spec(self) -> PointSpec:
        conv = self.model.stem[0]  # the patchify convolution
        return PointSpec(channels=int(conv.out_channels), stride=int(conv.stride[0]))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(feats)
