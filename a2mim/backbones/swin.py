"""Adapter for timm Swin Transformers (v1): NHWC features.

Points: ``stem`` (the patch embedding's output, stride = patch size) and ``stage1`` ..
``stage4`` (outputs of ``layers.0`` .. ``layers.3``; each stage but the first begins with its
patch merging). timm's Swin keeps features channels-last ``(B, H, W, C)`` throughout.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from a2mim.backbones.base import PointSpec, StagedAdapter


class SwinAdapter(StagedAdapter):
    family = "swin"
    model_types = (SwinTransformer,)
    channels_last = True

    def stem(self, img_bchw: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(img_bchw)

    def stages(self) -> list[nn.Module]:
        return list(self.model.layers)

    def stage_module(self, index: int) -> str:
        return f"layers.{index}"

    def stem_spec(self) -> PointSpec:
        pe = self.model.patch_embed
        return PointSpec(channels=int(pe.proj.out_channels), stride=int(pe.patch_size[0]))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.norm(feats)
