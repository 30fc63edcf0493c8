"""The learnable mask token, applied to a feature map at one point of the encoder.

* ``add`` (A²MIM): ``x + token * m``; with a per-channel ``gamma`` (the reference's ResNet
  "init" configs, gamma initialised to 1e-6): ``x * (1 - m) + x * m * gamma + token * m``.
* ``replace`` (SimMIM, at the first layer): ``x * (1 - m) + token * m``.

With a binary mask these are evaluated with ``torch.where``, which gives exactly the formulas'
values (``x * 0 == 0`` and ``x * 1 == x`` in floating point) without extra full-size products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

TokenMode = Literal["add", "replace"]
TokenInit = Literal["trunc_normal", "zeros"]


class MaskToken(nn.Module):
    """A per-channel token ``(C,)`` and optional per-channel ``gamma`` ``(C,)``."""

    def __init__(
        self,
        channels: int,
        mode: TokenMode = "add",
        init: TokenInit = "trunc_normal",
        gamma_init: float | None = None,
    ):
        super().__init__()
        if mode not in ("add", "replace"):
            raise ValueError(f"unknown token mode {mode!r}; use 'add' or 'replace'")
        if mode == "replace" and gamma_init is not None:
            raise ValueError("gamma only applies to the 'add' token mode; set token_gamma: null")
        self.mode = mode
        self.token = nn.Parameter(torch.zeros(channels))
        if init == "trunc_normal":
            # timm/reference: trunc_normal_(std=.02) with the default bounds (-2, 2).
            nn.init.trunc_normal_(self.token, std=0.02)
        elif init != "zeros":
            raise ValueError(f"unknown token init {init!r}; use 'trunc_normal' or 'zeros'")
        self.gamma = (
            nn.Parameter(torch.full((channels,), float(gamma_init)))
            if gamma_init is not None
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        channel_view: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``x`` in its native layout, ``mask`` a bool tensor broadcastable onto it (singleton
        channel dim), ``channel_view`` reshapes a ``(C,)`` vector to broadcast onto ``x``."""
        token = channel_view(self.token).to(x.dtype)
        if self.mode == "replace":
            return torch.where(mask, token, x)
        if self.gamma is None:
            return torch.where(mask, x + token, x)
        gamma = channel_view(self.gamma).to(x.dtype)
        return torch.where(mask, torch.addcmul(token, x, gamma), x)
