"""What a Mask R-CNN detector is made of, independent of the library that builds it.

`DetectorSpec` is the ``model`` section of the ``detect`` stage's config. Both backends
(``torchvision_backend``, ``detectron2_backend``) read the same spec, so a recipe means the same
network whichever library runs it; the few places where the libraries differ are listed in
the backend modules' docstrings.

Architectures (``arch``):

- ``c4``: the ResNet "C4" Mask R-CNN of MoCo / the A²MIM paper (Table 3): the backbone runs up to
  the stride-16 stage (``res4``); the box and mask heads share RoIAlign(14x14) + the pretrained
  last stage (``res5``, stride 2 inside the head) of the same encoder.
- ``fpn``: every stage of a hierarchical encoder (``res2`` .. ``res5``) into an FPN (P2-P6).
- ``sfp``: a plain ViT with the ViTDet simple feature pyramid built from its last (stride-16)
  map: P2..P5 by deconvolution / pooling, P6 by max-pooling P5 (the paper's Table 4 set-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from a2mim.config import Range

__all__ = ["SPEC_RANGES", "DetectorSpec", "Input"]


@dataclass(frozen=True)
class DetectorSpec:
    """The detector. ``backbone``, ``backbone_kwargs`` and ``img_size`` must match the pretrain
    run whose ``encoder.pt`` initialises it (``img_size`` is the pre-training resolution: the
    ViT position embedding is stored at that grid and resampled to each detection input).

    Normalisation of CNN encoders (``norm``): ``bn`` trains BatchNorm with per-device batch
    statistics, ``sync_bn`` synchronises them across processes (MoCo's detection protocol),
    ``frozen_bn`` fixes the pretrained statistics and affine parameters (detectron2's default
    for ImageNet-supervised weights; refused without ``init``, since random-init ResNets with
    frozen BN diverge at once). ``extra_res5_norm`` adds MoCo's BatchNorm after the C4 head's
    res5.

    ViT options: ``window_size`` (tokens) gives windowed attention in every block except
    ``global_blocks`` (0-based; an empty tuple means global attention everywhere);
    ``rel_pos_bias`` adds a BEiT-style relative position bias table per block, initialised to
    zero (paper appendix A.2).
    """

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    arch: Literal["c4", "fpn", "sfp"] = "c4"
    norm: Literal["bn", "sync_bn", "frozen_bn"] = "sync_bn"
    extra_res5_norm: bool = False
    drop_path_rate: float = 0.0
    window_size: int | None = None
    global_blocks: tuple[int, ...] = ()
    rel_pos_bias: bool = False
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch_per_image: int = 256
    rpn_pre_nms_topk_train: int = 2000
    rpn_post_nms_topk_train: int = 1000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_test: int = 1000
    roi_batch_per_image: int = 512
    box_fc_dim: int = 1024
    mask_conv_dim: int = 256
    mask_num_conv: int = 4
    score_thresh: float = 0.05
    detections_per_image: int = 100


@dataclass(frozen=True)
class Input:
    """Input resizing, as detectron2's ``ResizeShortestEdge``: the short side becomes a size
    drawn from ``min_size_train`` (one value: fixed) unless the long side would exceed
    ``max_size_train``; evaluation uses ``min_size_test`` / ``max_size_test``.

    ``resize``: ``pil`` (detectron2's pipeline: bilinear on the 8-bit image with antialiasing,
    as PIL; `a2mim.detection.resize`) or ``float`` (bilinear on the float tensor without
    antialiasing, torchvision's own transform; the toy recipes were measured with it)."""

    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    resize: Literal["pil", "float"] = "pil"

    @property
    def max_side(self) -> int:
        """The longest image side any input can reach."""
        return max(self.max_size_train, self.max_size_test)


_ONE_UP, _FRACTION = Range(lo=1), Range(lo=0, hi=1)
SPEC_RANGES = {  # the numeric fields of DetectorSpec and Input (checked by the detect stage's load_config)
    "model": {
        "img_size": _ONE_UP,
        "drop_path_rate": Range(lo=0, hi=1, hi_open=True),
        "window_size": _ONE_UP,
        "global_blocks": Range(lo=0),
        "fpn_channels": _ONE_UP,
        "anchor_sizes": Range(lo=0, lo_open=True),
        "aspect_ratios": Range(lo=0, lo_open=True),
        "rpn_batch_per_image": _ONE_UP,
        "rpn_pre_nms_topk_train": _ONE_UP,
        "rpn_post_nms_topk_train": _ONE_UP,
        "rpn_pre_nms_topk_test": _ONE_UP,
        "rpn_post_nms_topk_test": _ONE_UP,
        "roi_batch_per_image": _ONE_UP,
        "box_fc_dim": _ONE_UP,
        "mask_conv_dim": _ONE_UP,
        "mask_num_conv": _ONE_UP,
        "score_thresh": _FRACTION,
        "detections_per_image": _ONE_UP,
    },
    "input": {
        "min_size_train": _ONE_UP,
        "max_size_train": _ONE_UP,
        "min_size_test": _ONE_UP,
        "max_size_test": _ONE_UP,
    },
}
