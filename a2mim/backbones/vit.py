"""Adapter for timm Vision Transformers (``vit_*``, DeiT geometry and the reference's ViT-S).

Points ``layer0`` .. ``layer{depth}`` follow the paper's mask-token layer k:

* ``layer0``: right after the patch embedding, before the position embedding and the cls token
  are added; features ``(B, N, C)`` hold patch tokens only.
* ``layer{k}``, k >= 1: the input of block k (1-based), i.e. the output of block k-1 (or of
  ``norm_pre`` for k = 1); features ``(B, P + N, C)`` start with P prefix tokens (cls,
  registers), which a mask never touches.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from a2mim.backbones.base import BackboneAdapter, Edit, PointSpec


class VisionTransformerAdapter(BackboneAdapter):
    family = "vit"
    model_types = (VisionTransformer,)

    def __init__(self, model: VisionTransformer):
        super().__init__(model)
        if not getattr(model.patch_embed, "flatten", True) or getattr(
            model, "dynamic_img_size", False
        ):
            raise ValueError(
                "the ViT adapter needs a fixed-size timm ViT whose patch embedding flattens to "
                "(B, N, C); create it without dynamic_img_size=True"
            )

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def points(self) -> tuple[str, ...]:
        return tuple(f"layer{k}" for k in range(self.depth + 1))

    @property
    def first_point(self) -> str:
        return "layer0"

    def point_spec(self, point: str) -> PointSpec:
        self.check_point(point)
        return self._feature_info("blocks.0")

    def final_spec(self) -> PointSpec:
        return self._feature_info(f"blocks.{self.depth - 1}")

    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        m = self.model
        k = int(point[5:]) if (point is not None and edit is not None) else -1
        x = m.patch_embed(img_bchw)
        if k == 0:
            x = edit(x)
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        for i, block in enumerate(m.blocks, start=1):
            if i == k:
                x = edit(x)
            x = block(x)
        return m.norm(x)

    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        tokens = feats[:, self.model.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(feats.shape[0], -1, h, w)

    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        mask_bn = mask_bhw.flatten(1)
        prefix = self.model.num_prefix_tokens
        if point != "layer0" and prefix:
            mask_bn = torch.cat([mask_bn.new_zeros(mask_bn.shape[0], prefix), mask_bn], dim=1)
        return mask_bn[..., None]

    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        return vec_c.view(1, 1, -1)
