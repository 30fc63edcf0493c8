"""The timm encoder of a detector, shared by both backends: created, loaded, and cut into the
feature maps Mask R-CNN reads.

- `create_encoder`: the timm model of a `DetectorSpec` (random init), the pretrain
  ``encoder.pt`` loaded strictly (``a2mim.train.encoder.load_encoder``), then its BatchNorms
  converted as ``spec.norm`` says (after loading: frozen BN has no ``num_batches_tracked``).
- `StagedBody`: a hierarchical encoder (ResNet, ConvNeXt, ... any ``StagedAdapter`` family) as
  named maps ``res2`` .. ``res5`` (channels and strides from the adapter, i.e. timm's
  ``feature_info``); for ``arch: c4`` it stops at ``res4`` and hands its last stage to the RoI
  heads (`StagedBody.res5`), so the pretrained ``layer4`` is the C4 head.
- `ViTBody`: a plain timm ViT (the reference ViT, timm BEiT: `a2mim.detection.vit_body.BeitBody`)
  as one stride-16 map ``(B, C, h, w)``, ViTDet style: the position
  embedding is resampled to each input's grid (timm ``dynamic_img_size``), prefix tokens (cls)
  are dropped after it, blocks run with windowed or global attention, and an optional
  zero-initialised relative position bias per block (`RelativePositionBias`) enters attention as
  the additive float ``attn_mask`` that timm's blocks accept, so no timm module is patched.
- `vit_layer_id`: the layer index of a detector parameter for layer-wise lr decay.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from a2mim.backbones import adapt
from a2mim.backbones.base import PointSpec, StagedAdapter
from a2mim.config import ConfigError
from a2mim.detection.spec import DetectorSpec
from a2mim.models.beit_transfer import encoder_family, is_beit
from a2mim.train.encoder import create_classifier, load_encoder

__all__ = [
    "RelativePositionBias",
    "StagedBody",
    "ViTBody",
    "build_body",
    "c4_trunk",
    "convert_norm",
    "create_encoder",
    "vit_layer_id",
]


def create_encoder(spec: DetectorSpec, init: str | None) -> tuple[nn.Module, dict | None]:
    """``(timm model, init report or None)``: ``spec.backbone`` without classifier, loaded from
    ``init`` (a pretrain ``encoder.pt``) when given. ViTs are created with
    ``dynamic_img_size=True`` (same weights, any input grid). Random init draws from the global
    torch generator: seed it first."""
    extra: dict[str, Any] = {}
    if spec.drop_path_rate > 0:
        extra["drop_path_rate"] = spec.drop_path_rate
    if spec.arch == "sfp" and encoder_family(spec.backbone, spec.backbone_kwargs) != "beit":
        extra["dynamic_img_size"] = True  # (BeitBody resamples the embedding itself)
    model = create_classifier(spec.backbone, 0, spec.img_size, {**spec.backbone_kwargs, **extra})
    report = None
    if init is not None:
        report = load_encoder(
            model, init, spec.backbone, spec.img_size, spec.backbone_kwargs, allow_new_head=False
        )
    return model, report


def convert_norm(module: nn.Module, norm: str, world_size: int = 1) -> nn.Module:
    """``module`` with its BatchNorm2d layers converted in place (returned for chaining).

    ``frozen_bn``: torchvision ``FrozenBatchNorm2d`` holding the current statistics and affine
    values; ``sync_bn``: ``nn.SyncBatchNorm`` when several processes train (with one process it
    computes exactly what BatchNorm does, so BatchNorm is kept); ``bn``: unchanged.
    """
    if norm == "sync_bn" and world_size > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if norm != "frozen_bn":
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            convert_norm(child, norm, world_size)
    return module


class StagedBody(nn.Module):
    """A hierarchical timm encoder as detectron2-named feature maps ``res2`` .. ``res5``.

    ``stop_at_res4`` (C4): the forward ends after the stride-16 stage and `res5` is left to the
    RoI heads. ``forward(img_bchw)`` returns an ordered ``{name: (B, C, h, w)}``.
    """

    def __init__(self, encoder: nn.Module, stop_at_res4: bool = False):
        super().__init__()
        adapter = adapt(encoder)
        if not isinstance(adapter, StagedAdapter) or len(adapter.stages()) != 4:
            raise ConfigError(
                f"{type(encoder).__name__}: arch fpn/c4 needs a hierarchical encoder with 4 "
                f"stages (ResNet, ConvNeXt, ...); use arch: sfp for a plain ViT"
            )
        self.encoder = encoder
        self._adapter = adapter
        self.stop_at_res4 = stop_at_res4
        names = [f"res{i + 2}" for i in range(4)]
        specs = [adapter.point_spec(f"stage{i + 1}") for i in range(4)]
        self.specs: dict[str, PointSpec] = dict(zip(names, specs, strict=True))
        if stop_at_res4:
            del self.specs["res5"]

    @property
    def res5(self) -> nn.Module:
        """The encoder's last stage (stride 2 on its input): the C4 RoI head."""
        return self._adapter.stages()[-1]

    @property
    def res5_channels(self) -> int:
        return self._adapter.point_spec("stage4").channels

    def forward(self, img_bchw: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        adapter = self._adapter
        x = adapter.stem(img_bchw)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage in zip(self.specs, adapter.stages(), strict=False):
            x = stage(x)
            out[name] = x.permute(0, 3, 1, 2) if adapter.channels_last else x
        return out


def c4_trunk(body: StagedBody, spec: DetectorSpec, world_size: int = 1) -> nn.Module:
    """The C4 RoI heads' trunk: the body's pretrained last stage, followed by MoCo's extra
    BatchNorm (normalised as ``spec.norm``) when ``spec.extra_res5_norm``."""
    if not spec.extra_res5_norm:
        return body.res5
    norm = convert_norm(nn.Sequential(nn.BatchNorm2d(body.res5_channels)), spec.norm, world_size)
    return nn.Sequential(OrderedDict(res5=body.res5, norm=norm[0]))


class RelativePositionBias(nn.Module):
    """BEiT-style relative position bias over a grid of up to ``extent x extent`` tokens.

    One learnable value per head and relative offset ``(dy, dx)``, ``|dy|, |dx| < extent``,
    initialised to zero (so a freshly added bias leaves the pretrained attention unchanged).
    ``forward(h, w)`` returns the additive attention bias ``(1, heads, h*w, h*w)``.
    """

    def __init__(self, extent: int, num_heads: int):
        super().__init__()
        self.extent = extent
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * extent - 1) ** 2, num_heads)
        )

    def forward(self, h: int, w: int) -> torch.Tensor:
        if max(h, w) > self.extent:
            raise ValueError(
                f"a {h}x{w} token grid exceeds the relative position bias extent {self.extent}; "
                f"raise input.max_size_train/max_size_test's bound or lower the input size"
            )
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        span = 2 * self.extent - 1
        dy = ys[:, None] - ys[None, :] + self.extent - 1
        dx = xs[:, None] - xs[None, :] + self.extent - 1
        index_nn = (dy * span + dx).to(self.relative_position_bias_table.device)
        bias_nnh = self.relative_position_bias_table[index_nn]
        return bias_nnh.permute(2, 0, 1).unsqueeze(0)


def _window_partition(x_bhwc: torch.Tensor, size: int) -> tuple[torch.Tensor, int, int]:
    """``(windows (B*nw, size*size, C), padded h, padded w)``; zero padding at the bottom and
    right up to a multiple of ``size``."""
    b, h, w, c = x_bhwc.shape
    hp, wp = math.ceil(h / size) * size, math.ceil(w / size) * size
    x = nn.functional.pad(x_bhwc, (0, 0, 0, wp - w, 0, hp - h))
    x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c), hp, wp


def _window_unpartition(
    windows: torch.Tensor, size: int, b: int, hp: int, wp: int, h: int, w: int
) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(b, hp // size, wp // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, :h, :w]


def _padding_bias(b: int, h: int, w: int, size: int, device: torch.device) -> torch.Tensor | None:
    """Additive key mask ``(B*nw, 1, 1, size*size)``: -inf on padding tokens, None without
    padding."""
    hp, wp = math.ceil(h / size) * size, math.ceil(w / size) * size
    if (hp, wp) == (h, w):
        return None
    valid = torch.zeros(1, hp, wp, 1, device=device)
    valid[:, :h, :w] = 1
    valid_win, _, _ = _window_partition(valid.expand(b, -1, -1, -1), size)
    bias = torch.zeros_like(valid_win).masked_fill(valid_win == 0, float("-inf"))
    return bias.permute(0, 2, 1).unsqueeze(1)


class ViTBody(nn.Module):
    """A timm ViT as one ``(B, C, h, w)`` map at the patch stride (``{"last": ...}``).

    Blocks not in ``global_blocks`` attend within ``window_size x window_size`` windows (the
    grid is zero-padded to whole windows and padding is masked out of the keys); each block is
    called whole on the window batch, so its drop path draws per window rather than per image
    (ViTDet draws per image). The encoder's final ``norm`` is applied, as in pre-training.
    ``rel_pos_extent`` bounds the grid of global blocks (input side / patch size).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        window_size: int | None,
        global_blocks: tuple[int, ...],
        rel_pos_bias: bool,
        rel_pos_extent: int,
    ):
        super().__init__()
        depth = len(encoder.blocks)
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"model.global_blocks {bad} outside the ViT's blocks 0..{depth - 1}")
        self.encoder = encoder
        self.windowed = [window_size is not None and i not in global_blocks for i in range(depth)]
        self.window_size = window_size
        heads = encoder.blocks[0].attn.num_heads
        self.rel_pos = None
        if rel_pos_bias:
            self.rel_pos = nn.ModuleList(
                RelativePositionBias(window_size if win else rel_pos_extent, heads)
                for win in self.windowed
            )
        self.spec = PointSpec(
            channels=encoder.num_features, stride=int(encoder.patch_embed.patch_size[0])
        )

    def embed(self, img_bchw: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, h, w, C)`` with the position embedding resampled to their grid
        (timm ``dynamic_img_size``), prefix tokens dropped."""
        m = self.encoder
        x = m.patch_embed(img_bchw)  # (B, h, w, C): dynamic_img_size keeps the grid
        b, h, w, c = x.shape
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        return x[:, m.num_prefix_tokens :].reshape(b, h, w, c)

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
        """One encoder block on tokens ``(N, L, C)`` with an additive attention ``mask``."""
        return block(x, attn_mask=mask)

    def forward(self, img_bchw: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        m = self.encoder
        x_bhwc = self.embed(img_bchw)
        b, h, w, c = x_bhwc.shape
        pad_bias = None
        if any(self.windowed):
            pad_bias = _padding_bias(b, h, w, self.window_size, x_bhwc.device)
        for i, block in enumerate(m.blocks):
            bias = None if self.rel_pos is None else self.rel_pos[i]
            if self.windowed[i]:
                size = self.window_size
                windows, hp, wp = _window_partition(x_bhwc, size)
                mask = _add(None if bias is None else bias(size, size), pad_bias)
                windows = self.run_block(block, windows, _as_dtype(mask, windows))
                x_bhwc = _window_unpartition(windows, size, b, hp, wp, h, w)
            else:
                mask = None if bias is None else bias(h, w)
                tokens = self.run_block(block, x_bhwc.reshape(b, h * w, c), _as_dtype(mask, x_bhwc))
                x_bhwc = tokens.view(b, h, w, c)
        x_bhwc = m.norm(x_bhwc)
        return OrderedDict(last=x_bhwc.permute(0, 3, 1, 2).contiguous())


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b


def _as_dtype(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Attention masks must match the query dtype (autocast runs blocks in bf16/fp16)."""
    return None if mask is None else mask.to(like.dtype)


def build_body(
    spec: DetectorSpec, init: str | None, max_side: int, world_size: int = 1
) -> tuple[StagedBody | ViTBody, dict | None]:
    """The encoder body of ``spec`` and the init report. ``max_side`` (longest input side,
    after padding) sizes the relative position bias of global ViT blocks."""
    encoder, report = create_encoder(spec, init)
    if spec.arch == "sfp" and is_beit(encoder):  # the reference ViT (a2mim.detection.vit_body)
        from a2mim.detection.vit_body import build_beit_body

        body = build_beit_body(encoder, spec, max_side)
        return body, (None if report is None else {**report, "rel_pos_tables": body.tables})
    if spec.arch == "sfp":
        if not isinstance(encoder, VisionTransformer):
            raise ConfigError(
                f"model.arch sfp needs a plain ViT, got {type(encoder).__name__}; use arch fpn "
                f"or c4 for hierarchical encoders"
            )
        patch = int(encoder.patch_embed.patch_size[0])
        if patch != 16:
            raise ConfigError(
                f"model.arch sfp builds P2-P5 from a stride-16 map (ViTDet); {spec.backbone} "
                f"with {spec.backbone_kwargs} has patch size {patch}: use a patch-16 ViT"
            )
        extent = math.ceil(max_side / 32) * 32 // patch  # inputs are padded to multiples of 32
        body = ViTBody(encoder, spec.window_size, spec.global_blocks, spec.rel_pos_bias, extent)
        return body, report
    convert_norm(encoder, spec.norm, world_size)
    return StagedBody(encoder, stop_at_res4=spec.arch == "c4"), report


_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.blocks|rel_pos)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)encoder\.(?:patch_embed|pos_embed|cls_token|reg_token)")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index of detector parameter ``name`` for layer-wise lr decay (ViTDet / BEiT):
    0 for the patch and position embeddings, ``i + 1`` for block ``i`` (and its relative
    position bias), ``depth + 1`` for everything else (final norm, neck, heads). The lr scale
    is ``decay ** (depth + 1 - id)``."""
    if _EMBED.search(name):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1
