"""The reference ViT (timm ``Beit``: LayerScale, per-block relative position bias, absolute
position embedding; `a2mim.backbones.beit`) as a ViTDet-style detection body.

`BeitBody` is `a2mim.detection.backbone.ViTBody` with BEiT's embedding and blocks:

- the absolute position embedding is resampled to each input's patch grid in every forward
  (bicubic, ``align_corners=False``, no antialiasing: ViTDet's ``get_abs_pos``); the cls token is
  prepended with its own entry and dropped after it (ViTDet drops it; it stays in the autograd
  graph, so DistributedDataParallel sees every parameter used);
- each block's pretrained relative position bias table is resized once, when the body is built,
  to the window that block runs on: ``window_size`` for windowed blocks (14 = the 224 px
  pre-training grid: the table unchanged), and for global blocks the largest padded input grid
  (``extent`` = longest side padded to 32, over the patch size). The resize is timm's
  ``resize_rel_pos_bias_table`` (BEiT's geometric-progression scheme, so near offsets keep
  their values); the 3 cls entries are then dropped (no cls token attends here). The table
  moves from ``encoder.blocks.<i>.attn`` to the body's ``rel_pos.<i>``
  (`a2mim.detection.backbone.RelativePositionBias`), which gives, per forward, the bias of the
  grid actually seen (the table's centre: the same offsets, whatever the image size); it
  enters timm's block as ``shared_rel_pos_bias`` together with the padding mask of the windows,
  so no timm module is patched;
- ``model.rel_pos_bias: false`` removes the pretrained tables (no relative position bias in
  detection, as the A2MIM repo's mmdetection config); ``true`` with an encoder without tables
  adds zero-initialised ones (as for the plain ViT).

The encoder is loaded strictly at its pre-training geometry before any of this
(`a2mim.detection.backbone.create_encoder`), so the checkpoint's keys are checked as written.
"""

from __future__ import annotations

import torch
from torch import nn

from a2mim.config import ConfigError
from a2mim.detection.backbone import RelativePositionBias, ViTBody
from a2mim.detection.spec import DetectorSpec
from a2mim.models.beit_transfer import CLS_ENTRIES, resample_pos_embed, resize_rel_pos_table

__all__ = ["BeitBody", "build_beit_body"]


class BeitBody(ViTBody):
    """A timm BEiT as one ``(B, C, h, w)`` map at the patch stride (``{"last": ...}``); see the
    module docstring. ``tables`` records what happened to the pretrained tables
    (``resized``: block -> ``old grid -> new extent``, or ``removed``)."""

    def __init__(
        self,
        encoder: nn.Module,
        window_size: int | None,
        global_blocks: tuple[int, ...],
        rel_pos_bias: bool,
        rel_pos_extent: int,
    ):
        if getattr(encoder, "rel_pos_bias", None) is not None:
            raise ConfigError(
                "a BEiT with a shared relative position bias (use_shared_rel_pos_bias) has no "
                "per-block tables to resize per window; use use_rel_pos_bias (per block)"
            )
        super().__init__(encoder, window_size, global_blocks, False, rel_pos_extent)
        pe = encoder.patch_embed
        if tuple(pe.patch_size) != (pe.patch_size[0],) * 2:
            raise ConfigError(f"BeitBody needs square patches, got {tuple(pe.patch_size)}")
        self.tables: dict[str, str] = {}
        heads = encoder.blocks[0].attn.num_heads
        pretrained = [blk.attn.relative_position_bias_table is not None for blk in encoder.blocks]
        if not rel_pos_bias:
            for i, block in enumerate(encoder.blocks):
                if pretrained[i]:
                    self.tables[f"blocks.{i}"] = "removed (model.rel_pos_bias: false)"
                _drop_table(block.attn)
            return
        biases = []
        for i, (block, windowed) in enumerate(zip(encoder.blocks, self.windowed, strict=True)):
            size = window_size if windowed else rel_pos_extent
            bias = RelativePositionBias(size, heads)
            attn = block.attn
            if pretrained[i]:
                old = tuple(attn.window_size)
                table = resize_rel_pos_table(attn.relative_position_bias_table, old, (size, size))
                with torch.no_grad():
                    bias.relative_position_bias_table.copy_(table[:-CLS_ENTRIES])
                self.tables[f"blocks.{i}"] = f"{old[0]}x{old[1]} -> {size}x{size}"
            _drop_table(attn)
            biases.append(bias)
        self.rel_pos = nn.ModuleList(biases)

    def embed(self, img_bchw: torch.Tensor) -> torch.Tensor:
        m = self.encoder
        pe = m.patch_embed
        x = pe.proj(img_bchw)  # (B, C, h, w): any input divisible by the patch size
        b, c, h, w = x.shape
        x = pe.norm(x.flatten(2).transpose(1, 2))
        x = torch.cat((m.cls_token.expand(b, -1, -1), x), dim=1)
        if m.pos_embed is not None:
            grid = tuple(pe.grid_size)
            x = x + resample_pos_embed(m.pos_embed, grid, (h, w), m.num_prefix_tokens)
        x = m.pos_drop(x)
        return x[:, m.num_prefix_tokens :].reshape(b, h, w, c)

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
        return block(x, shared_rel_pos_bias=mask)


def _drop_table(attn: nn.Module) -> None:
    """Take the relative position table (and its index) out of a timm BEiT attention, so that
    it attends with the body's bias only."""
    attn.relative_position_bias_table = None
    attn.relative_position_index = None
    attn.window_size = None


def build_beit_body(encoder: nn.Module, spec: DetectorSpec, max_side: int) -> BeitBody:
    """`BeitBody` of a loaded BEiT encoder for ``spec`` (arch sfp); ``max_side`` (longest input
    side) sets the extent of the global blocks' tables (sides are padded to multiples of 32)."""
    patch = int(encoder.patch_embed.patch_size[0])
    if patch != 16:
        raise ConfigError(
            f"model.arch sfp builds P2-P5 from a stride-16 map (ViTDet); {spec.backbone} with "
            f"{spec.backbone_kwargs} has patch size {patch}: use a patch-16 ViT"
        )
    extent = -(-max_side // 32) * 32 // patch
    return BeitBody(encoder, spec.window_size, spec.global_blocks, spec.rel_pos_bias, extent)
