"""Adapter for timm Swin Transformers (v1): NHWC features.

Points: ``stem`` (the patch embedding's output, stride = patch size) and ``stage1`` ..
``stage4`` (outputs of ``layers.0`` .. ``layers.3``; each stage but the first begins with its
patch merging). timm's Swin keeps features channels-last ``(B, H, W, C)`` throughout.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer

from a2mim.backbones.base import BackboneAdapter, Edit, PointSpec


class SwinAdapter(BackboneAdapter):
    family = "swin"
    model_types = (SwinTransformer,)

    @property
    def points(self) -> tuple[str, ...]:
        return ("stem", *tuple(f"stage{i}" for i in range(1, len(self.model.layers) + 1)))

    @property
    def first_point(self) -> str:
        return "stem"

    def point_spec(self, point: str) -> PointSpec:
        self.check_point(point)
        if point == "stem":
            pe = self.model.patch_embed
            return PointSpec(channels=int(pe.proj.out_channels), stride=int(pe.patch_size[0]))
        return self._feature_info(f"layers.{int(point[5:]) - 1}")

    def final_spec(self) -> PointSpec:
        return self._feature_info(f"layers.{len(self.model.layers) - 1}")

    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(img_bchw)
        if point == "stem" and edit is not None:
            x = edit(x)
        for i, layer in enumerate(m.layers, start=1):
            x = layer(x)
            if point == f"stage{i}" and edit is not None:
                x = edit(x)
        return m.norm(x)

    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.permute(0, 3, 1, 2)

    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        return mask_bhw[..., None]

    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        return vec_c.view(1, 1, 1, -1)
