"""UperNet on a timm encoder, configured as mmsegmentation's ADE20K models.

The heads are the transformers implementation (``UperNetHead``: PPM with pool scales
(1, 2, 3, 6) on the last feature map + FPN over all four; ``UperNetFCNHead``: the auxiliary FCN
on the third map), which matches mmseg's ``UPerHead`` / ``FCNHead`` layer for layer (3x3 and 1x1
conv + BN + ReLU, bilinear with ``align_corners=False``). Two mmseg details transformers leaves
out are added here: ``Dropout2d(0.1)`` before each classifier (mmseg ``dropout_ratio``) and
mmseg's initialisation (Kaiming-normal fan-out convs, BN 1/0, classifier N(0, 0.01)).

The encoder is a timm model whose multi-scale features come from ``forward_intermediates`` at
``out_indices`` (indices into its ``feature_info``; channels and strides are read from there):

* hierarchical encoders (ResNet, ConvNeXt, Swin): the last four stages, used as they are;
* plain ViTs (one stride everywhere): four blocks (MAE / BEiT use blocks 4, 6, 8, 12 of ViT-B),
  without the final norm, turned into strides 4, 8, 16, 32 by BEiT's simple pyramid
  (mmseg ``Feature2Pyramid``: deconv-BN-GELU-deconv x4, deconv x2, identity, max-pool /2). The
  ViT is built at the crop size with ``dynamic_img_size`` so other sizes (whole-image testing)
  interpolate the position embedding, as mmseg's ViTs do.
* the reference ViT (timm BEiT, `a2mim.models.beit_transfer`): the same pyramid, but the
  encoder is built at the crop size only (its per-block relative position tables are fixed to
  the crop's grid, as in mmseg's / BEiT's own segmentation code): `load_init` resamples the
  pre-training position embedding (bicubic) and tables (timm's BEiT resize, the 3 cls entries
  kept) to that grid, and `UperNetSegmenter.predict` pads smaller inputs to the crop (bottom /
  right, zeros) and crops the logits back; larger inputs need ``eval.mode: slide``.

Layers after the last used index (and a ViT's final norm) are pruned, so every parameter gets a
gradient (DistributedDataParallel needs no unused-parameter search).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from a2mim.models.beit_transfer import is_beit, resize_state_to
from a2mim.train import checkpoint
from a2mim.train.encoder import create_classifier, load_encoder
from a2mim.train.param_groups import build_param_groups, timm_layer_ids

__all__ = [
    "SimplePyramid",
    "UperNetSegmenter",
    "build_upernet",
    "load_init",
    "param_groups",
    "slide_logits",
    "whole_logits",
]


class SimplePyramid(nn.Module):
    """Four same-stride ViT maps ``(B, C, h, w)`` -> strides x4, x2, x1, x0.5 of them
    (BEiT / MAE segmentation; mmseg ``Feature2Pyramid`` with rescales 4, 2, 1, 0.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"SimplePyramid takes 4 feature maps, got {len(feats)}")
        ops = (self.up4, self.up2, self.keep, self.down2)
        return [op(x) for op, x in zip(ops, feats, strict=True)]


def _is_plain(model: nn.Module) -> bool:
    """True for encoders whose every ``feature_info`` entry has the same stride (plain ViTs)."""
    return len({int(info["reduction"]) for info in model.feature_info}) == 1


def default_out_indices(model: nn.Module) -> list[int]:
    """Hierarchical encoders: the last four ``feature_info`` entries (ResNet: layer1..layer4).
    Plain ViTs: four evenly spaced blocks ending with the last (12 blocks: 2, 5, 8, 11; the
    BEiT / MAE recipes choose 3, 5, 7, 11 explicitly)."""
    n = len(model.feature_info)
    if _is_plain(model):
        return [round(n * k / 4) - 1 for k in (1, 2, 3, 4)]
    return list(range(n - 4, n))


def _mmseg_init(module: nn.Module) -> None:
    """mmcv ``ConvModule`` init: Kaiming-normal (fan-out, ReLU) convs without bias, BN 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _with_dropout(head: nn.Module, dropout: float) -> None:
    """mmseg's ``Dropout2d`` before the 1x1 classifier, which starts at N(0, 0.01)."""
    classifier = head.classifier
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    head.classifier = nn.Sequential(nn.Dropout2d(dropout), classifier)


class UperNetSegmenter(nn.Module):
    """Encoder (+ simple pyramid for plain ViTs) + UperNet head + optional auxiliary FCN head.

    ``forward(img_bchw) -> (logits_bkhw, aux_logits_bkhw or None)`` at the stride of the first
    feature map (4); ``predict`` upsamples the main logits to the input size.

    Attributes read by `param_groups`: ``layer_ids`` (encoder parameter name -> timm layer group,
    from the unpruned encoder's ``group_matcher``), ``top_layer`` (the group of every parameter
    outside the encoder, one above the encoder's last, as timm gives a classifier head) and
    ``no_decay_names`` (the encoder's ``no_weight_decay()`` patterns).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        out_indices: list[int] | None = None,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        aux_channels: int | None = 256,
        aux_in_index: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        infos = list(backbone.feature_info)
        indices = list(out_indices) if out_indices is not None else default_out_indices(backbone)
        bad = [i for i in indices if not 0 <= i < len(infos)]
        if bad or len(indices) != 4 or indices != sorted(set(indices)):
            raise ValueError(
                f"out_indices must be 4 increasing indices into the encoder's feature_info "
                f"(0..{len(infos) - 1}: {[info['module'] for info in infos]}), got {indices}"
            )
        if not 0 <= aux_in_index < 4:
            raise ValueError(f"aux_in_index must be 0..3 (one of the 4 maps), got {aux_in_index}")
        self.plain = _is_plain(backbone)
        self.out_indices = indices
        # fixed input side of encoders whose grid is fixed at creation (BEiT); None: any size
        self.fixed_size: int | None = None
        if is_beit(backbone):
            self.fixed_size = int(backbone.patch_embed.img_size[0])
        self.layer_ids: dict[str, int] = timm_layer_ids(backbone)
        self.top_layer = max(self.layer_ids.values(), default=-1) + 1
        no_decay = getattr(backbone, "no_weight_decay", None)
        self.no_decay_names: set[str] = set(no_decay()) if callable(no_decay) else set()

        chans = [int(infos[i]["num_chs"]) for i in indices]
        strides = [int(infos[i]["reduction"]) for i in indices]
        if self.plain:
            self.neck: nn.Module | None = SimplePyramid(chans[0])
            strides = [strides[0] // 4, strides[0] // 2, strides[0], strides[0] * 2]
        else:
            self.neck = None
        backbone.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.in_channels, self.strides = chans, strides

        config = UperNetConfig(
            hidden_size=channels,
            pool_scales=list(pool_scales),
            num_labels=num_classes,
            auxiliary_channels=aux_channels or 256,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
        )
        self.decode_head = UperNetHead(config, in_channels=chans)
        self.auxiliary_head = (
            UperNetFCNHead(config, in_channels=chans, in_index=aux_in_index)
            if aux_channels
            else None
        )
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                _mmseg_init(head)
                _with_dropout(head, dropout)

    def features(self, img_bchw: torch.Tensor) -> list[torch.Tensor]:
        """The four maps the heads read, strides ``self.strides``."""
        feats = self.backbone.forward_intermediates(
            img_bchw, indices=self.out_indices, norm=False, intermediates_only=True
        )
        return self.neck(list(feats)) if self.neck is not None else list(feats)

    def forward(self, img_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.features(img_bchw)
        aux = self.auxiliary_head(feats) if self.auxiliary_head is not None else None
        return self.decode_head(feats), aux

    def predict(self, img_bchw: torch.Tensor) -> torch.Tensor:
        """Main-head logits ``(B, K, H, W)`` at the input size (bilinear, as mmseg). An encoder
        of fixed input size (BEiT) sees the input zero-padded (bottom / right) to that size;
        the logits of the padding are cut off."""
        height, width = img_bchw.shape[-2:]
        size = self.fixed_size
        if size is not None and (height, width) != (size, size):
            if height > size or width > size:
                raise ValueError(
                    f"a {height}x{width} input exceeds the {size}x{size} input of this "
                    f"encoder (its relative position tables are fixed to the crop's grid): "
                    f"use eval.mode slide (crops of data.crop_size)"
                )
            img_bchw = F.pad(img_bchw, (0, size - width, 0, size - height))
        logits, _ = self(img_bchw)
        logits = F.interpolate(
            logits, size=img_bchw.shape[-2:], mode="bilinear", align_corners=False
        )
        return logits[..., :height, :width]


def create_encoder(
    name: str, crop_size: int, backbone_kwargs: dict[str, Any], drop_path_rate: float
) -> nn.Module:
    """The timm encoder (random init, no classifier) at ``crop_size``; a plain ViT is rebuilt
    with ``dynamic_img_size`` / ``dynamic_img_pad`` so that any input size works (a BEiT stays
    at ``crop_size``: see `UperNetSegmenter.predict`)."""
    kwargs = {**backbone_kwargs, "drop_path_rate": drop_path_rate}
    model = create_classifier(name, 0, crop_size, kwargs)
    if _is_plain(model) and not is_beit(model):
        model = create_classifier(
            name, 0, crop_size, {**kwargs, "dynamic_img_size": True, "dynamic_img_pad": True}
        )
    return model


def build_upernet(
    name: str,
    num_classes: int,
    crop_size: int,
    backbone_kwargs: dict[str, Any] | None = None,
    drop_path_rate: float = 0.0,
    **head: Any,
) -> UperNetSegmenter:
    """A randomly initialised `UperNetSegmenter` on timm model ``name`` (``head``: the keyword
    arguments of `UperNetSegmenter`). Draws from the global torch generator: seed it first."""
    encoder = create_encoder(name, crop_size, dict(backbone_kwargs or {}), drop_path_rate)
    return UperNetSegmenter(encoder, num_classes, **head)


def load_init(
    model: UperNetSegmenter,
    path: str | Path,
    name: str,
    backbone_kwargs: dict[str, Any] | None = None,
    default_img_size: int = 224,
) -> dict[str, Any]:
    """Load a pretrain ``encoder.pt`` into ``model.backbone``, strictly.

    The checkpoint is first loaded into the encoder it was trained as (``name``,
    ``backbone_kwargs`` and the ``img_size`` of its meta, ``default_img_size`` without one), with `load_encoder`'s key check and
    messages; then its absolute position embedding, if any, is resampled to the segmentation
    grid (bicubic, as mmseg's ViTs resize it), a BEiT's per-block relative position tables to
    the grid's window (`a2mim.models.beit_transfer.resize_state_to`), and every remaining weight
    must fit the pruned encoder exactly. Keys of pruned layers (a ViT's final norm) are reported
    as ``dropped``; what was resampled as ``resized``.
    """
    ckpt = checkpoint.load(path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    own = model.backbone.state_dict()
    img_size = int((meta if isinstance(meta, dict) else {}).get("img_size") or default_img_size)
    reference = create_classifier(name, 0, img_size, backbone_kwargs)
    report = load_encoder(reference, path, name, img_size, backbone_kwargs, allow_new_head=False)
    state = reference.state_dict()
    resized = []
    if is_beit(reference) and is_beit(model.backbone):
        state, resized = resize_state_to(state, reference, model.backbone)
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model.backbone, "no_embed_class", False) else None
        prefix = model.backbone.num_prefix_tokens if prefix is None else prefix
        grid = list(model.backbone.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=grid, num_prefix_tokens=prefix, antialias=False
        )
        resized.append(f"pos_embed: {tuple(pos.shape)} -> {tuple(own['pos_embed'].shape)}")
    dropped = sorted(set(state) - set(own))
    for key in dropped:
        state.pop(key)
    checkpoint.load_encoder_strict(model.backbone, state, str(path))
    return {**report, "loaded": len(state), "dropped": dropped, "resized": resized}


def param_groups(
    model: UperNetSegmenter, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer groups: no weight decay for 1-d parameters (norms, biases) and the encoder's
    ``no_weight_decay()`` names; with ``layer_decay`` each group carries
    ``lr_scale = layer_decay ** (top_layer - layer)``, where the encoder's layers come from
    timm's ``group_matcher`` (ViT: embeddings 0, block i -> i + 1) and the neck and heads sit
    on ``top_layer`` (scale 1): mmseg's ``LayerDecayOptimizerConstructor`` for BEiT / MAE.
    The timm scheduler multiplies each group's lr by its ``lr_scale``."""
    if layer_decay is not None and not model.layer_ids:
        raise ValueError(
            f"layer_decay needs an encoder with timm's group_matcher(); "
            f"{type(model.backbone).__name__} has none: set optim.layer_decay to null"
        )

    def encoder_name(name: str) -> str | None:
        return name[len("backbone.") :] if name.startswith("backbone.") else None

    def no_decay(name: str, param: nn.Parameter) -> bool:
        sub = encoder_name(name)
        return param.ndim <= 1 or (
            sub is not None and any(fnmatch.fnmatch(sub, pat) for pat in model.no_decay_names)
        )

    def layer_of(name: str) -> int:
        sub = encoder_name(name)
        return model.top_layer if sub is None else model.layer_ids.get(sub, model.top_layer)

    return build_param_groups(
        model.named_parameters(),
        weight_decay,
        no_decay,
        layer_of=layer_of,
        num_layers=model.top_layer,
        layer_decay=layer_decay,
    )


def whole_logits(model: nn.Module, img_bchw: torch.Tensor) -> torch.Tensor:
    """mmseg ``whole`` inference: one pass, logits ``(B, K, H, W)`` at the input size."""
    return model.predict(img_bchw)


def slide_logits(model: nn.Module, img_bchw: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg ``slide`` inference: ``crop x crop`` windows every ``stride`` pixels (the last
    window of a row / column flush with the border; windows are the image where it is smaller
    than ``crop``), logits averaged where windows overlap; ``(B, K, H, W)`` at the input size.
    One image's windows go through the model as one batch."""
    batch, _, height, width = img_bchw.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    out = None
    count = torch.zeros(1, 1, height, width, device=img_bchw.device)
    for b in range(batch):
        crops = torch.stack([img_bchw[b, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
        logits = model.predict(crops).float()
        if out is None:
            out = img_bchw.new_zeros(batch, logits.shape[1], height, width, dtype=torch.float32)
        for (y1, y2, x1, x2), part in zip(boxes, logits, strict=True):
            out[b, :, y1:y2, x1:x2] += part
    for y1, y2, x1, x2 in boxes:
        count[:, :, y1:y2, x1:x2] += 1
    return out / count
