"""The lightweight A²MIM/SimMIM decoder: a 1x1 convolution and a PixelShuffle to pixels."""

from __future__ import annotations

import torch
from torch import nn


class PixelShuffleDecoder(nn.Module):
    """``(B, C, h, w) -> (B, out_channels, h * stride, w * stride)``; init as the reference."""

    def __init__(self, in_channels: int, stride: int, out_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, stride * stride * out_channels, kernel_size=1)
        # As the reference necks (OpenMixup NonLinearMIMNeck / SimMIMNeck ``init_weights``):
        # weight trunc-normal(std 0.02, bounds +-2), bias 0; not PyTorch's default uniform.
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feats_bchw: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(feats_bchw))
