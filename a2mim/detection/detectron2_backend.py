"""Mask R-CNN from detectron2 (the paper's library) on a timm encoder.

detectron2 is an optional dependency, built from upstream source (``a2mim.detection`` says how
when it is missing); only this module imports it, and only `a2mim.detection.build_detector`
imports this module.

- ``build_a2mim_timm_backbone`` is registered in detectron2's ``BACKBONE_REGISTRY`` (on first
  use, not at import) and reads its settings from the ``MODEL.A2MIM`` node of the config that
  `detectron2_config` writes: the `DetectorSpec` (JSON), the ``encoder.pt`` path, the longest
  input side and the number of processes. It wraps the shared timm body
  (`a2mim.detection.backbone`) as a detectron2 ``Backbone`` (`TimmBackbone`) and puts
  detectron2's own ``FPN`` (``fpn``) or ``SimpleFeaturePyramid`` (``sfp``) on it; ``c4``
  returns the ``res4`` body alone.
- `Detectron2MaskRCNN` builds ``GeneralizedRCNN`` with ``detectron2.modeling.build_model`` and,
  for C4, gives the ``Res5ROIHeads`` the encoder's pretrained last stage as its ``res5``
  (detectron2 would otherwise build a fresh res5 from its config). Its forward takes and returns
  the same tensors as the torchvision backend: images in [0, 1] at their original size (it
  resizes them as detectron2's ``ResizeShortestEdge`` would, the short side drawn from
  ``min_size_train`` with the global torch generator), targets with labels 1..K, and
  predictions rescaled to the original size, in float32 whatever the autocast.
- The config describes the network that is built, and `Detectron2MaskRCNN.config_yaml` adds the
  solver so that the stage saves it with the run (``detectron2_config.yaml``): ``FREEZE_AT: 0``
  (every layer trains; ``frozen_bn`` freezes BatchNorm only), ``RESNETS.NORM`` the encoder's
  normalisation as built (``SyncBN`` with several processes, ``BN`` with one, ``FrozenBN``),
  ``ROI_HEADS.NAME: Res5ROIHeadsExtraNorm`` (MoCo's class, registered here) when the C4 head
  carries the extra norm. detectron2 builds that res5 from its config; it is then replaced by
  the encoder's pretrained last stage (+ the norm), the same structure with pretrained weights.
- As detectron2's data pipeline: the resize is PIL's bilinear on 8-bit images (torchvision's
  antialiased uint8 resize, within 2/255 of PIL), masks resize with PIL's nearest rule, and
  targets carrying ``polygons`` give ``PolygonMasks`` (rasterised per RoI, as detectron2 does
  for COCO) instead of full-image bitmaps. C4 inputs are padded to the batch maximum (ResNet
  backbones have no size divisibility in detectron2); FPN and ViT inputs to multiples of 32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, Backbone, build_model
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torch import nn

from a2mim.config import from_dict, to_dict
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from a2mim.detection.backbone import StagedBody, ViTBody, build_body, c4_trunk
from a2mim.detection.resize import resize_shortest_edge
from a2mim.detection.spec import DetectorSpec, Input

__all__ = [
    "Detectron2MaskRCNN",
    "Res5ROIHeadsExtraNorm",
    "TimmBackbone",
    "build_a2mim_timm_backbone",
    "detectron2_config",
    "resize_shortest_edge",
]

Target = dict[str, Any]
SIZE_DIVISIBILITY = 32


_NORM_NAMES = {"bn": "BN", "sync_bn": "SyncBN", "frozen_bn": "FrozenBN"}


class TimmBackbone(Backbone):
    """A shared timm body (`StagedBody` or `ViTBody`) as a detectron2 ``Backbone``: maps
    ``res2`` .. ``res5`` (``res4`` only for C4) or ``last`` (ViT, stride 16). C4 bodies pad
    inputs to the batch maximum only (size divisibility 0, as detectron2's ResNet)."""

    def __init__(self, body: StagedBody | ViTBody):
        super().__init__()
        self.body = body
        self._divisibility = 0 if getattr(body, "stop_at_res4", False) else SIZE_DIVISIBILITY
        specs = body.specs if isinstance(body, StagedBody) else {"last": body.spec}
        self._out_features = list(specs)
        self._out_feature_channels = {k: s.channels for k, s in specs.items()}
        self._out_feature_strides = {k: s.stride for k, s in specs.items()}

    @property
    def size_divisibility(self) -> int:
        return self._divisibility

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.body(x))


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """MoCo's C4 head (``detection/train_net.py``): detectron2's res5 followed by one more
    normalisation layer of type ``MODEL.RESNETS.NORM``. Registered under MoCo's name so that
    the saved config says what was built."""

    def _build_res5_block(self, cfg: CfgNode):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


class _PaddedSimpleFeaturePyramid(SimpleFeaturePyramid):
    """detectron2's ``SimpleFeaturePyramid`` with its stride constraint honoured: upstream
    reports it under the misspelled key ``"size_divisiblity"`` and relies on ViTDet's square
    padding, so without that padding images reach the ViT at sizes that are not multiples of
    the P5 stride and the pyramid levels disagree with the anchors."""

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


def build_a2mim_timm_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2 backbone builder (``MODEL.BACKBONE.NAME``) for the ``MODEL.A2MIM`` node.

    The returned backbone carries ``a2mim_body`` (the timm body) and ``a2mim_init_report``."""
    node = cfg.MODEL.A2MIM
    spec = from_dict(DetectorSpec, json.loads(node.SPEC), "MODEL.A2MIM.SPEC")
    body, report = build_body(spec, node.INIT or None, node.MAX_SIDE, node.WORLD_SIZE)
    bottom_up = TimmBackbone(body)
    if spec.arch == "c4":
        backbone: Backbone = bottom_up
    elif spec.arch == "fpn":
        backbone = FPN(
            bottom_up=bottom_up,
            in_features=["res2", "res3", "res4", "res5"],
            out_channels=spec.fpn_channels,
            norm="",
            top_block=LastLevelMaxPool(),
        )
    else:
        backbone = _PaddedSimpleFeaturePyramid(
            net=bottom_up,
            in_feature="last",
            out_channels=spec.fpn_channels,
            scale_factors=(4.0, 2.0, 1.0, 0.5),
            top_block=LastLevelMaxPool(),
            norm="LN",
        )
    backbone.a2mim_body = body
    backbone.a2mim_init_report = report
    return backbone


def _register() -> None:
    """Register the backbone builder and MoCo's ROI heads once (detectron2's registries refuse
    a second registration; a class of that name registered by another script is kept)."""
    if build_a2mim_timm_backbone.__name__ not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_a2mim_timm_backbone)
    if Res5ROIHeadsExtraNorm.__name__ not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def effective_norm(spec: DetectorSpec, world_size: int) -> str:
    """The normalisation the encoder is built with: ``sync_bn`` is plain ``bn`` in one
    process (it computes the same), see `a2mim.detection.backbone.convert_norm`."""
    return "bn" if spec.norm == "sync_bn" and world_size == 1 else spec.norm


def detectron2_config(
    spec: DetectorSpec,
    inputs: Input,
    num_classes: int,
    init: str | None = None,
    world_size: int = 1,
) -> CfgNode:
    """The detectron2 config of ``spec`` (defaults from ``get_cfg()``, as in detectron2's
    ``Base-RCNN-C4.yaml`` / ``Base-RCNN-FPN.yaml`` for the parts a spec does not set). It
    describes the network as built: every layer trains (``FREEZE_AT: 0``), the encoder's
    normalisation, MoCo's ``Res5ROIHeadsExtraNorm`` for C4 with ``extra_res5_norm``."""
    cfg = get_cfg()
    m = cfg.MODEL
    m.DEVICE = "cpu"  # the stage moves the model to its device
    m.WEIGHTS = ""  # the encoder comes from MODEL.A2MIM.INIT; the rest is random
    m.BACKBONE.FREEZE_AT = 0
    # a plain ViT (sfp) has no BatchNorm: RESNETS.* does not apply, NORM "" says so
    m.RESNETS.NORM = "" if spec.arch == "sfp" else _NORM_NAMES[effective_norm(spec, world_size)]
    m.RESNETS.STRIDE_IN_1X1 = False  # timm / torchvision ResNets stride in the 3x3 conv
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.MASK_ON = True
    m.PIXEL_MEAN = [255.0 * v for v in IMAGENET_MEAN]
    m.PIXEL_STD = [255.0 * v for v in IMAGENET_STD]
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(inputs.min_size_train)
    cfg.INPUT.MAX_SIZE_TRAIN = inputs.max_size_train
    cfg.INPUT.MIN_SIZE_TEST = inputs.min_size_test
    cfg.INPUT.MAX_SIZE_TEST = inputs.max_size_test
    m.BACKBONE.NAME = build_a2mim_timm_backbone.__name__
    m.A2MIM = CfgNode()
    m.A2MIM.SPEC = json.dumps(to_dict(spec))
    m.A2MIM.INIT = init or ""
    m.A2MIM.MAX_SIDE = inputs.max_side
    m.A2MIM.WORLD_SIZE = world_size

    ratios = [float(r) for r in spec.aspect_ratios]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [ratios]
    rpn, roi, box, mask = m.RPN, m.ROI_HEADS, m.ROI_BOX_HEAD, m.ROI_MASK_HEAD
    rpn.PRE_NMS_TOPK_TRAIN = spec.rpn_pre_nms_topk_train
    rpn.POST_NMS_TOPK_TRAIN = spec.rpn_post_nms_topk_train
    rpn.PRE_NMS_TOPK_TEST = spec.rpn_pre_nms_topk_test
    rpn.POST_NMS_TOPK_TEST = spec.rpn_post_nms_topk_test
    rpn.BATCH_SIZE_PER_IMAGE = spec.rpn_batch_per_image
    roi.NUM_CLASSES = num_classes
    roi.BATCH_SIZE_PER_IMAGE = spec.roi_batch_per_image
    roi.SCORE_THRESH_TEST = spec.score_thresh
    cfg.TEST.DETECTIONS_PER_IMAGE = spec.detections_per_image
    mask.CONV_DIM = spec.mask_conv_dim
    if spec.arch == "c4":
        m.ANCHOR_GENERATOR.SIZES = [list(spec.anchor_sizes)]
        rpn.IN_FEATURES = ["res4"]
        roi.NAME = "Res5ROIHeadsExtraNorm" if spec.extra_res5_norm else "Res5ROIHeads"
        roi.IN_FEATURES = ["res4"]
        box.POOLER_RESOLUTION = 14
        mask.NUM_CONV = 0
        # sizes the box predictor and mask head for the encoder's res5 (res5 = 8 x res2)
        m.RESNETS.RES2_OUT_CHANNELS = _res5_channels(spec) // 8
    else:
        m.ANCHOR_GENERATOR.SIZES = [[s] for s in spec.anchor_sizes]
        rpn.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        roi.NAME = "StandardROIHeads"
        roi.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        box.NAME = "FastRCNNConvFCHead"
        box.NUM_FC = 2
        box.FC_DIM = spec.box_fc_dim
        box.POOLER_RESOLUTION = 7
        mask.NAME = "MaskRCNNConvUpsampleHead"
        mask.NUM_CONV = spec.mask_num_conv
        mask.POOLER_RESOLUTION = 14
    return cfg


def _res5_channels(spec: DetectorSpec) -> int:
    """Channels of the encoder's last stage, from timm's ``feature_info`` (no weights built)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(spec.backbone, num_classes=0, **spec.backbone_kwargs)
    return int(model.feature_info[-1]["num_chs"])


def _gt_masks(target: Target, image_size: tuple[int, int]) -> PolygonMasks | BitMasks:
    """``PolygonMasks`` when every instance has polygons (detectron2's COCO default: masks
    rasterised per RoI from the polygons; the bitmaps are then not decoded at all), else
    full-image ``BitMasks``."""
    polygons = target.get("polygons")
    if polygons is not None and all(p is not None for p in polygons):
        return PolygonMasks(
            [[np.asarray(p, dtype=np.float64) for p in polys] for polys in polygons]
        )
    return BitMasks(target["masks"].bool())


class Detectron2MaskRCNN(nn.Module):
    """detectron2 ``GeneralizedRCNN`` for ``num_classes`` foreground classes on the encoder of
    ``spec`` (``init``: a pretrain ``encoder.pt``); ``cfg`` is its detectron2 config and
    ``init_report`` what was loaded. Random init draws from the global torch generator."""

    backend = "detectron2"

    def __init__(
        self,
        spec: DetectorSpec,
        inputs: Input,
        num_classes: int,
        init: str | None = None,
        world_size: int = 1,
    ):
        super().__init__()
        _register()
        self.inputs = inputs
        self.cfg = detectron2_config(spec, inputs, num_classes, init, world_size)
        self.net = build_model(self.cfg)
        body = self.net.backbone.a2mim_body
        self.init_report = self.net.backbone.a2mim_init_report
        if spec.arch == "c4":
            self.net.roi_heads.res5 = c4_trunk(body, spec, world_size)

    def config_yaml(self, solver: Mapping[str, Any]) -> str:
        """The detectron2 config of this network with the run's solver filled in, as YAML.

        ``solver``: ``lr`` (absolute, for ``ims_per_batch`` images per step), ``ims_per_batch``,
        ``max_iter``, ``steps``, ``gamma``, ``warmup_iters``, ``warmup_factor``, ``momentum``,
        ``weight_decay``, ``weight_decay_norm``, ``opt``, ``layer_decay``, ``grad_clip``,
        ``amp`` (``none``, ``bf16``, ``fp16``) and ``precise_bn_iters`` (0: off)."""
        cfg = self.cfg.clone()
        sol = cfg.SOLVER
        sol.BASE_LR = float(solver["lr"])
        sol.IMS_PER_BATCH = int(solver["ims_per_batch"])
        sol.MAX_ITER = int(solver["max_iter"])
        sol.STEPS = tuple(int(s) for s in solver["steps"])
        sol.GAMMA = float(solver["gamma"])
        sol.WARMUP_ITERS = int(solver["warmup_iters"])
        sol.WARMUP_FACTOR = float(solver["warmup_factor"])
        sol.MOMENTUM = float(solver["momentum"])
        sol.WEIGHT_DECAY = float(solver["weight_decay"])
        sol.WEIGHT_DECAY_NORM = float(solver["weight_decay_norm"])
        sol.OPTIMIZER = str(solver["opt"]).upper()  # not a detectron2 key: SGD or ADAMW
        sol.LAYER_DECAY = solver.get("layer_decay")  # not a detectron2 key (ViTDet's lazy config)
        clip = solver.get("grad_clip")
        sol.CLIP_GRADIENTS.ENABLED = clip is not None
        if clip is not None:
            sol.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
            sol.CLIP_GRADIENTS.CLIP_VALUE = float(clip)
        sol.AMP.ENABLED = solver.get("amp", "none") != "none"
        sol.AMP.PRECISION = str(solver.get("amp", "none"))  # not a detectron2 key
        iters = int(solver.get("precise_bn_iters", 0))
        cfg.TEST.PRECISE_BN.ENABLED = iters > 0
        cfg.TEST.PRECISE_BN.NUM_ITER = iters if iters > 0 else 200
        return cfg.dump()

    def _batch(
        self, images: list[torch.Tensor], targets: list[Target] | None
    ) -> list[dict[str, Any]]:
        """detectron2's input dicts: resized RGB images in 0..255, ``height``/``width`` of the
        original (predictions are rescaled to it) and, when training, ``instances``."""
        batch = []
        for i, img_chw in enumerate(images):
            if self.training:
                sizes = self.inputs.min_size_train
                short = sizes[int(torch.randint(len(sizes), (1,)))]
                max_size = self.inputs.max_size_train
            else:
                short, max_size = self.inputs.min_size_test, self.inputs.max_size_test
            target = None if targets is None else targets[i]
            img, target = resize_shortest_edge(img_chw, target, short, max_size, self.inputs.resize)
            item: dict[str, Any] = {
                "image": img * 255.0,
                "height": img_chw.shape[-2],
                "width": img_chw.shape[-1],
            }
            if target is not None:
                inst = Instances(tuple(img.shape[-2:]))
                inst.gt_boxes = Boxes(target["boxes"])
                inst.gt_classes = target["labels"] - 1  # detectron2 classes are 0..K-1
                inst.gt_masks = _gt_masks(target, tuple(img.shape[-2:]))
                item["instances"] = inst
            batch.append(item)
        return batch

    def forward(
        self, images: list[torch.Tensor], targets: list[Target] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (boxes, labels, masks)")
            # detectron2's heads record training statistics in an EventStorage (its trainer
            # opens one); ours are the returned losses, so a throw-away storage receives them
            with EventStorage():
                return self.net(self._batch(images, targets))
        outputs = self.net(self._batch(images, None))
        preds = []
        for out in outputs:
            inst = out["instances"]
            preds.append(
                {  # float32 whatever the autocast: bf16 scores tie and COCOeval ranks ties
                    "boxes": inst.pred_boxes.tensor.float(),
                    "scores": inst.scores.float(),
                    "labels": inst.pred_classes + 1,
                    "masks": inst.pred_masks.bool(),
                }
            )
        return preds
