"""Adapter for timm ConvNeXts (``convnext_atto`` .. ``convnext_base``): NCHW features.

Points: ``stem`` (the patchify stem's output) and ``stage1`` .. ``stage4`` (outputs of
``stages.0`` .. ``stages.3``).
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt

from a2mim.backbones.base import BackboneAdapter, Edit, PointSpec


class ConvNeXtAdapter(BackboneAdapter):
    family = "convnext"
    model_types = (ConvNeXt,)

    @property
    def points(self) -> tuple[str, ...]:
        return ("stem", *tuple(f"stage{i}" for i in range(1, len(self.model.stages) + 1)))

    @property
    def first_point(self) -> str:
        return "stem"

    def point_spec(self, point: str) -> PointSpec:
        self.check_point(point)
        if point == "stem":
            # The stem feeds stage 0 unchanged in resolution unless stage 0 downsamples: its
            # output channels are the first conv's, its stride that conv's stride.
            conv = self.model.stem[0]
            return PointSpec(channels=int(conv.out_channels), stride=int(conv.stride[0]))
        return self._feature_info(f"stages.{int(point[5:]) - 1}")

    def final_spec(self) -> PointSpec:
        return self._feature_info(f"stages.{len(self.model.stages) - 1}")

    def forward_features(
        self, img_bchw: torch.Tensor, point: str | None = None, edit: Edit | None = None
    ) -> torch.Tensor:
        m = self.model
        x = m.stem(img_bchw)
        if point == "stem" and edit is not None:
            x = edit(x)
        for i, stage in enumerate(m.stages, start=1):
            x = stage(x)
            if point == f"stage{i}" and edit is not None:
                x = edit(x)
        return m.norm_pre(x)

    def final_to_bchw(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def mask_at(self, mask_bhw: torch.Tensor, point: str) -> torch.Tensor:
        return mask_bhw[:, None]

    def channel_view(self, vec_c: torch.Tensor, point: str) -> torch.Tensor:
        return vec_c.view(1, -1, 1, 1)
