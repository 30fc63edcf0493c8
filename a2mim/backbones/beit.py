"""Adapter for timm's BEiT family (``timm.models.beit.Beit``): the reference code's ViT.

The A²MIM / SimMIM reference ViT (OpenMixup ``SimMIMViT`` with ``use_window=True,
init_values=0.1``) is a ViT with LayerScale (init 0.1), a relative position bias per block over
the patch grid (plus 3 entries for the cls token), the absolute position embedding *as well*,
qkv bias (q and v only), LayerNorm eps 1e-6 and a final LayerNorm. timm's ``Beit`` builds
exactly that with ``use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=0.1`` (and
``global_pool="token"``, which keeps the final ``norm`` instead of an ``fc_norm``).

Points ``layer0`` .. ``layer{depth}`` as for the plain ViT adapter: ``layer0`` is right after the
patch embedding, before the cls token and the position embedding (patch tokens only, where the
reference's ``mask_layer=0`` puts the token); ``layer{k}`` (k >= 1) is the input of block k
(1-based), with the cls token first.
"""

from __future__ import annotations

import torch
from timm.models.beit import Beit

from a2mim.backbones.base import BackboneAdapter, Edit, PointSpec


class BeitAdapter(BackboneAdapter):
    family = "beit"
    model_types = (Beit,)

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
        """timm ``Beit.forward_features`` (no gradient checkpointing) with ``edit`` at ``point``."""
        m = self.model
        k = int(point[5:]) if (point is not None and edit is not None) else -1
        x = m.patch_embed(img_bchw)
        if k == 0:
            x = edit(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        x = m.pos_drop(x)
        shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        for i, block in enumerate(m.blocks, start=1):
            if i == k:
                x = edit(x)
            x = block(x, shared_rel_pos_bias=shared)
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
