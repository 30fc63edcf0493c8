"""Mask R-CNN from torchvision (``torchvision.models.detection.MaskRCNN``) on a timm encoder.

`TorchvisionMaskRCNN` builds the network a `DetectorSpec` describes from torchvision parts:
``fpn`` = the encoder's four stages into torchvision's ``FeaturePyramidNetwork`` (+ max-pool
P6); ``sfp`` = the ViTDet simple feature pyramid (`SimpleFeaturePyramid`) on a ViT; ``c4`` =
RoIAlign 14x14 on the stride-16 map, with the encoder's own last stage (+ global average pool)
as the box head and the same stage as the mask head's trunk. torchvision's
``GeneralizedRCNNTransform`` draws the short side from ``min_size_train`` with the global torch
generator (so a caller that seeds it per step gets reproducible sizes) and pads to a multiple of
32 (``fpn``, ``sfp``) or to the batch maximum only (``c4``, as detectron2's ResNet backbones);
with ``input.resize: pil`` (default) the resize itself is detectron2's (`a2mim.detection.resize`:
PIL-like bilinear on the 8-bit image, sizes rounded half up) instead of torchvision's float
bilinear without antialiasing (``float``), and the ImageNet normalisation follows it.

Differences from detectron2 with the same spec: torchvision's RoIAlign is the legacy
``aligned=False`` one (detectron2's ``ROIAlignV2`` is aligned), its box-regression losses are
smooth-L1 with beta 1/9 (detectron2: L1), and its mask head trains from full-image bitmaps
(detectron2: COCO polygons rasterised per RoI).

``forward(images, targets)`` returns the loss dict in training mode; in eval mode it returns, per
image, ``{"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,) in 1..K, "masks": (N, H, W)
bool}`` at the input image's size, boxes and scores in float32 whatever the autocast (bf16
scores tie, and COCOeval ranks ties arbitrarily).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from a2mim.detection.backbone import StagedBody, ViTBody, build_body, c4_trunk
from a2mim.detection.resize import resize_shortest_edge
from a2mim.detection.spec import DetectorSpec, Input

__all__ = ["C4Head", "ShortestEdgeTransform", "SimpleFeaturePyramid", "TorchvisionMaskRCNN"]

Target = dict[str, Any]
_LEVELS = ("0", "1", "2", "3")  # torchvision's names for P2..P5; "pool" is P6


class _StagedFPN(nn.Module):
    """``res2`` .. ``res5`` of a `StagedBody` into torchvision's FPN: ``{"0".."3", "pool"}``."""

    def __init__(self, body: StagedBody, channels: int):
        super().__init__()
        self.body = body
        in_channels = [spec.channels for spec in body.specs.values()]
        self.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, img_bchw: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(img_bchw)
        return self.fpn(OrderedDict(zip(_LEVELS, feats.values(), strict=True)))


class _StagedC4(nn.Module):
    """The stride-16 map (``res4``) of a `StagedBody` as torchvision's single level ``"0"``."""

    def __init__(self, body: StagedBody):
        super().__init__()
        self.body = body
        self.out_channels = body.specs["res4"].channels

    def forward(self, img_bchw: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(img_bchw)["res4"])])


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on a stride-16 ViT map: P2 (two 2x deconvolutions with
    LayerNorm + GELU between), P3 (one deconvolution), P4 (identity), P5 (2x2 max-pool), each
    followed by 1x1 and 3x3 convolutions with LayerNorm; P6 = stride-2 subsampling of P5 (the
    FPN's max-pool level). Returns torchvision's ``{"0".."3", "pool"}``."""

    def __init__(self, body: ViTBody, channels: int):
        super().__init__()
        self.body = body
        dim = body.spec.channels
        up4 = [
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        ]
        scales: list[tuple[list[nn.Module], int]] = [
            (up4, dim // 4),
            ([nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2),
            ([], dim),
            ([nn.MaxPool2d(2, stride=2)], dim),
        ]
        self.levels = nn.ModuleList(
            nn.Sequential(
                *layers,
                nn.Conv2d(in_dim, channels, 1, bias=False),
                LayerNorm2d(channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                LayerNorm2d(channels),
            )
            for layers, in_dim in scales
        )
        self.out_channels = channels

    def forward(self, img_bchw: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.body(img_bchw)["last"]
        out = OrderedDict(
            (name, level(x)) for name, level in zip(_LEVELS, self.levels, strict=True)
        )
        out["pool"] = nn.functional.max_pool2d(out["3"], 1, 2, 0)
        return out


class ShortestEdgeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with detectron2's resize (`resize_shortest_edge`) of
    the ``[0, 1]`` image, normalised afterwards (torchvision normalises first, then resizes
    the float image). The short side is drawn as torchvision draws it."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image  # after the resize, which works on the 8-bit values

    def resize(
        self, image: torch.Tensor, target: Target | None = None
    ) -> tuple[torch.Tensor, Target | None]:
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        image, target = resize_shortest_edge(image, target, short, self.max_size)
        return super().normalize(image), target


class C4Head(nn.Module):
    """The C4 box head: the encoder's last stage on the 14x14 RoI features, then global
    average pooling: ``(R, C4, 14, 14) -> (R, C5)``. ``trunk`` is shared with the mask head."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, roi_rchw: torch.Tensor) -> torch.Tensor:
        return self.trunk(roi_rchw).mean(dim=(2, 3))


class TorchvisionMaskRCNN(nn.Module):
    """torchvision Mask R-CNN for ``num_classes`` foreground classes (labels 1..K) on the encoder
    of ``spec``, initialised from ``init`` (``encoder.pt``) when given; ``init_report`` says
    what was loaded. Random init draws from the global torch generator: seed it first."""

    backend = "torchvision"

    def __init__(
        self,
        spec: DetectorSpec,
        inputs: Input,
        num_classes: int,
        init: str | None = None,
        world_size: int = 1,
    ):
        super().__init__()
        self.inputs = inputs
        body, self.init_report = build_body(spec, init, inputs.max_side, world_size)
        k1 = num_classes + 1  # + background
        ratios = tuple(float(r) for r in spec.aspect_ratios)
        if spec.arch == "c4":
            backbone: nn.Module = _StagedC4(body)
            anchors = AnchorGenerator((spec.anchor_sizes,), (ratios,))
            trunk = c4_trunk(body, spec, world_size)
            c5 = body.res5_channels
            heads: dict[str, Any] = {
                "box_roi_pool": MultiScaleRoIAlign(["0"], 14, sampling_ratio=0),
                "box_head": C4Head(trunk),
                "box_predictor": FastRCNNPredictor(c5, k1),
                "mask_roi_pool": MultiScaleRoIAlign(["0"], 14, sampling_ratio=0),
                "mask_head": trunk,
                "mask_predictor": MaskRCNNPredictor(c5, spec.mask_conv_dim, k1),
            }
        else:
            if spec.arch == "fpn":
                backbone = _StagedFPN(body, spec.fpn_channels)
            else:
                backbone = SimpleFeaturePyramid(body, spec.fpn_channels)
            anchors = AnchorGenerator(
                tuple((s,) for s in spec.anchor_sizes), (ratios,) * len(spec.anchor_sizes)
            )
            ch, dim = spec.fpn_channels, spec.mask_conv_dim
            heads = {
                "box_roi_pool": MultiScaleRoIAlign(list(_LEVELS), 7, sampling_ratio=0),
                "box_head": TwoMLPHead(ch * 7 * 7, spec.box_fc_dim),
                "box_predictor": FastRCNNPredictor(spec.box_fc_dim, k1),
                "mask_roi_pool": MultiScaleRoIAlign(list(_LEVELS), 14, sampling_ratio=0),
                "mask_head": MaskRCNNHeads(ch, (dim,) * spec.mask_num_conv, 1),
                "mask_predictor": MaskRCNNPredictor(dim if spec.mask_num_conv else ch, dim, k1),
            }
        self.net = MaskRCNN(
            backbone,
            num_classes=None,
            min_size=inputs.min_size_train,
            max_size=inputs.max_size_train,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=spec.rpn_pre_nms_topk_train,
            rpn_post_nms_top_n_train=spec.rpn_post_nms_topk_train,
            rpn_pre_nms_top_n_test=spec.rpn_pre_nms_topk_test,
            rpn_post_nms_top_n_test=spec.rpn_post_nms_topk_test,
            rpn_batch_size_per_image=spec.rpn_batch_per_image,
            box_batch_size_per_image=spec.roi_batch_per_image,
            box_score_thresh=spec.score_thresh,
            box_detections_per_img=spec.detections_per_image,
            **heads,
        )
        if inputs.resize == "pil":
            self.net.transform = ShortestEdgeTransform(
                inputs.min_size_train,
                inputs.max_size_train,
                list(IMAGENET_MEAN),
                list(IMAGENET_STD),
            )
        if spec.arch == "c4":
            self.net.transform.size_divisible = 1  # pad to the batch maximum only
        self._set_sizes(training=True)

    def _set_sizes(self, training: bool) -> None:
        transform = self.net.transform
        if training:
            transform.min_size = tuple(self.inputs.min_size_train)
            transform.max_size = self.inputs.max_size_train
        else:
            transform.min_size = (self.inputs.min_size_test,)
            transform.max_size = self.inputs.max_size_test

    def train(self, mode: bool = True) -> TorchvisionMaskRCNN:
        super().train(mode)
        self._set_sizes(training=mode)
        return self

    def forward(
        self, images: list[torch.Tensor], targets: list[Target] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (boxes, labels, masks)")
            keep = ("boxes", "labels", "masks")
            return self.net(images, [{k: t[k] for k in keep} for t in targets])
        outputs = self.net(images)
        return [
            {
                "boxes": out["boxes"].float(),
                "scores": out["scores"].float(),
                "labels": out["labels"],
                "masks": out["masks"][:, 0] > 0.5,
            }
            for out in outputs
        ]
