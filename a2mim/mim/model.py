"""One model class for A²MIM, SimMIM and every ablation of the paper.

``MaskedImageModel(cfg)`` composes a backbone adapter, the masked-input fill, the mask token,
the PixelShuffle decoder and the losses. What differs between methods is configuration only:

=================  ==========================  =============================
switch             A²MIM                        SimMIM
=================  ==========================  =============================
``fill``           ``mean`` (RGB mean)           ``none`` (paper's CNN variant: mean)
``token_mode``     ``add`` at a middle point     ``replace`` at the first point
``freq_weight``    0.5 (ResNet) / 0.1 (ViT)      0
=================  ==========================  =============================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from a2mim.backbones import create_backbone
from a2mim.mim.decoder import PixelShuffleDecoder
from a2mim.mim.losses import (
    SpatialLossKind,
    UnmaskedMode,
    focal_frequency_loss,
    frequency_residual,
    spatial_loss,
)
from a2mim.mim.mask_token import MaskToken, TokenInit
from a2mim.mim.masking import BlockMaskGenerator, FillMode, fill_masked, mask_scale, upsample_mask
from a2mim.train.param_groups import build_param_groups


@dataclass(frozen=True)
class MIMConfig:
    """Everything that defines a masked-image-modeling method (see docs/paper_vs_reference.md).

    ``token_point`` names a point of the backbone adapter (``stage3`` for ResNet's stage-3,
    ``layer5`` for ViT's layer 5); ``"first"`` means the adapter's first point (SimMIM).
    """

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, int | float | str | bool] = field(default_factory=dict)
    img_size: int = 224
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    fill: FillMode = "mean"
    token_mode: Literal["add", "replace", "none"] = "add"
    token_point: str = "stage3"
    token_init: TokenInit = "trunc_normal"
    token_gamma: float | None = 1e-6
    token_lr_scale: float = 1.0
    # Where the ResNet gamma goes in the optimizer: "token" (no weight decay, lr x
    # token_lr_scale: the reference 100-epoch config) or "decay" (the ordinary group: weight decay
    # and lr x1, as the reference 300-epoch config leaves it).
    gamma_group: Literal["token", "decay"] = "token"
    spatial_loss: SpatialLossKind = "l1"
    freq_weight: float = 0.5
    freq_alpha: float = 1.0
    freq_omega: bool = True
    freq_unmasked: UnmaskedMode = "mixed"
    freq_eps: float = 0.0
    freq_batch: int | None = 256

    def __post_init__(self):
        if self.freq_weight < 0:
            raise ValueError(f"freq_weight must be >= 0, got {self.freq_weight}")
        if self.freq_batch is not None and self.freq_batch < 1:
            raise ValueError(f"freq_batch must be >= 1 or null, got {self.freq_batch}")
        if not 0.0 <= self.freq_eps < 1.0:
            raise ValueError(f"freq_eps must be in [0, 1), got {self.freq_eps}")


@dataclass
class MIMOutput:
    """Result of one forward pass."""

    loss: torch.Tensor  # scalar: loss_spatial + freq_weight * loss_freq
    loss_spatial: torch.Tensor  # scalar
    loss_freq: torch.Tensor  # scalar (0 when freq_weight == 0)
    pred_bchw: torch.Tensor  # reconstruction in normalised image space
    mask_bhw: torch.Tensor  # pixel mask, bool, True = masked


class MaskedImageModel(nn.Module):
    """Backbone (``self.encoder``, a plain timm model) + mask token + decoder + losses."""

    def __init__(self, cfg: MIMConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter = create_backbone(cfg.backbone, img_size=cfg.img_size, **cfg.backbone_kwargs)
        self.encoder = self.adapter.model
        self.masker = BlockMaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.mask_ratio)

        final = self.adapter.final_spec()
        if cfg.img_size % final.stride:
            raise ValueError(
                f"img_size {cfg.img_size} is not divisible by the encoder stride {final.stride} "
                f"of {cfg.backbone}; use a multiple of {final.stride}"
            )
        self.token_point = None
        self.token = None
        if cfg.token_mode != "none":
            point = self.adapter.first_point if cfg.token_point == "first" else cfg.token_point
            self.adapter.check_point(point)
            spec = self.adapter.point_spec(point)
            self.token_scale = mask_scale(
                cfg.mask_patch_size, spec.stride, f"{cfg.backbone} point {point!r}"
            )
            self.token_point = point
            self.token = MaskToken(
                spec.channels,
                mode=cfg.token_mode,
                init=cfg.token_init,
                gamma_init=cfg.token_gamma,
            )
        self.decoder = PixelShuffleDecoder(final.channels, final.stride)

    # ------------------------------------------------------------------------------------------
    def encode(self, img_bchw: torch.Tensor, mask_bgg: torch.Tensor | None = None) -> torch.Tensor:
        """Final encoder features ``(B, C, h, w)`` of the filled image with the token applied.

        ``mask_bgg``: bool cell mask ``(B, g, g)``; None encodes the plain image.
        """
        if mask_bgg is None:
            return self.adapter.final_to_bchw(self.adapter.forward_features(img_bchw))
        mask_pix = upsample_mask(mask_bgg, self.cfg.mask_patch_size)[:, None]
        x = fill_masked(img_bchw, mask_pix, self.cfg.fill)
        edit = None
        if self.token is not None:
            mask_at = self.adapter.mask_at(
                upsample_mask(mask_bgg, self.token_scale), self.token_point
            )
            point = self.token_point

            def edit(feats: torch.Tensor) -> torch.Tensor:
                return self.token(feats, mask_at, lambda v: self.adapter.channel_view(v, point))

        feats = self.adapter.forward_features(x, self.token_point, edit)
        return self.adapter.final_to_bchw(feats)

    def forward(
        self,
        img_bchw: torch.Tensor,
        mask_bgg: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MIMOutput:
        """Mask, encode, decode and compute the losses.

        ``img_bchw``: normalised images; ``mask_bgg``: optional bool cell mask (drawn with
        ``generator`` when None).
        """
        cfg = self.cfg
        if img_bchw.shape[-1] != cfg.img_size or img_bchw.shape[-2] != cfg.img_size:
            raise ValueError(
                f"input is {tuple(img_bchw.shape[-2:])} px but the model was built for "
                f"img_size={cfg.img_size}"
            )
        if mask_bgg is None:
            mask_bgg = self.masker(img_bchw.shape[0], generator=generator, device=img_bchw.device)
        pred = self.decoder(self.encode(img_bchw, mask_bgg))
        mask_pix = upsample_mask(mask_bgg, cfg.mask_patch_size)[:, None]
        residual = pred.float() - img_bchw.float()
        loss_spa = spatial_loss(residual, mask_pix, cfg.spatial_loss)
        if cfg.freq_weight > 0:
            delta = frequency_residual(residual, mask_pix, cfg.freq_unmasked, cfg.freq_eps)
            loss_freq = focal_frequency_loss(delta, cfg.freq_alpha, cfg.freq_omega, cfg.freq_batch)
            loss = loss_spa + cfg.freq_weight * loss_freq
        else:
            loss_freq = loss_spa.new_zeros(())
            loss = loss_spa
        return MIMOutput(loss, loss_spa, loss_freq, pred, mask_pix[:, 0])

    # ------------------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on norms, biases, pos/cls embeddings and the token; the token
        gets ``lr_scale = token_lr_scale`` (0.1 for the reference ResNet). The gamma joins the
        token's group (``gamma_group: token``) or the decayed one (``gamma_group: decay``)."""
        no_decay = {f"encoder.{n}" for n in self.adapter.no_weight_decay()}
        token = {"weight_decay": 0.0, "lr_scale": self.cfg.token_lr_scale, "name": "token"}
        plain_gamma = {"weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"}

        def override(name: str) -> dict:
            if name == "token.gamma" and self.cfg.gamma_group == "decay":
                return plain_gamma
            return token if name.startswith("token.") else {}

        return build_param_groups(
            self.named_parameters(),
            weight_decay,
            lambda name, param: name in no_decay or param.ndim <= 1,
            overrides=override,
            key=lambda slot: ("decay", "no_decay", "token").index(slot.name),
            label=True,
        )

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain timm-keyed weights of the encoder alone (no token, no decoder)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
