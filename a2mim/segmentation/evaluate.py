"""Segmentation metrics (mIoU, aAcc, mAcc) and the whole / sliding-window evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from a2mim import predictions
from a2mim.config import bounded
from a2mim.models.upernet import UperNetSegmenter, slide_logits, whole_logits
from a2mim.segmentation.data import DataConfig


@dataclass(frozen=True)
class EvalConfig:
    """Test-time inference: ``whole`` (one pass; mmseg's ResNet UperNet) or ``slide``
    (``crop_size`` windows every ``stride`` pixels; mmseg's ViT UperNet, stride 341).
    ``every_steps``: also evaluate during training (null: only at the end)."""

    mode: Literal["whole", "slide"] = "whole"
    stride: int = bounded(341, ge=1)
    every_steps: int | None = bounded(None, ge=1)


class EvalSetup(Protocol):
    """What `evaluate` reads of a ``SegmentConfig``: its data and eval sections."""

    data: DataConfig
    eval: EvalConfig


class SegMetrics:
    """mmseg's segmentation metrics over many images, ignoring ``ignore_index`` pixels.

    ``miou``: torchmetrics ``MulticlassJaccardIndex(average="macro")``, the mean IoU over the
    classes present in the labels or the predictions (a class absent from both is left out, as
    mmseg's ``nanmean``). ``aacc``: correct / labelled pixels. ``macc``: mean per-class recall
    over the classes with labelled pixels. Percent. Counts are summed over ranks on ``compute``.
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        self.jaccard = MulticlassJaccardIndex(
            num_classes, average="macro", ignore_index=ignore_index
        ).to(device)
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index).to(device)

    def update(self, pred_bhw: torch.Tensor, label_bhw: torch.Tensor) -> None:
        self.jaccard.update(pred_bhw, label_bhw)
        self.confmat.update(pred_bhw, label_bhw)

    def compute(self) -> dict[str, Any]:
        """``{"miou", "aacc", "macc", "iou_per_class"}`` (per-class IoU NaN where a class is in
        neither labels nor predictions)."""
        cm = self.confmat.compute().double().cpu()  # rows: label, columns: prediction
        hits, labelled, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        union = labelled + predicted - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
        recall = torch.where(labelled > 0, hits / labelled.clamp(min=1), torch.nan)
        return {
            "miou": 100.0 * float(self.jaccard.compute()),
            "aacc": 100.0 * float(hits.sum() / cm.sum().clamp(min=1)),
            "macc": 100.0 * float(recall.nanmean()),
            "iou_per_class": [100.0 * float(v) for v in iou],
        }


@torch.no_grad()
def evaluate(
    model: UperNetSegmenter,
    loader: DataLoader,
    cfg: EvalSetup,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    per_image: list | None = None,
) -> dict[str, Any]:
    """`SegMetrics` of ``model`` over ``loader`` (items: test-size normalised image, label at
    its original size; batch size 1 since sizes differ): logits whole or slid, resized to the
    label, arg-max. ``per_image`` (when given) receives each image's per-class intersection
    and union counts, in the loader's order (:func:`a2mim.predictions.segmentation_counts`)."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(cfg.data.num_classes, cfg.data.ignore_index, device)
    for img_bchw, label_bhw in loader:
        img_bchw, label_bhw = img_bchw.to(device), label_bhw.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if cfg.eval.mode == "slide":
                logits = slide_logits(model, img_bchw, cfg.data.crop_size, cfg.eval.stride)
            else:
                logits = whole_logits(model, img_bchw)
        logits = F.interpolate(
            logits.float(), size=label_bhw.shape[-2:], mode="bilinear", align_corners=False
        )
        metrics.update(logits.argmax(1), label_bhw)
        if per_image is not None:
            for pred_hw, label_hw in zip(logits.argmax(1).cpu(), label_bhw.cpu(), strict=True):
                counts = predictions.segmentation_counts(
                    pred_hw.numpy(), label_hw.numpy(), cfg.data.num_classes, cfg.data.ignore_index
                )
                per_image.append(counts)
    model.train(was_training)
    return metrics.compute()
