"""The segmentation loss: pixel cross-entropy on logits resized to the label."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    """Pixel cross-entropy ignoring ``data.ignore_index``. mmseg's default
    (``avg_non_ignore: false``) divides by all pixels of the batch, ignored ones included;
    ``true`` divides by the labelled pixels only."""

    avg_non_ignore: bool = False


def seg_loss(
    logits_bkhw: torch.Tensor, label_bhw: torch.Tensor, ignore_index: int, avg_non_ignore: bool
) -> torch.Tensor:
    """Cross-entropy of logits resized (bilinear) to the label's size, in float32; the mean over
    all pixels (mmseg default, ignored pixels count as 0) or over labelled pixels only."""
    logits = F.interpolate(
        logits_bkhw.float(), size=label_bhw.shape[-2:], mode="bilinear", align_corners=False
    )
    loss_bhw = F.cross_entropy(logits, label_bhw, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss_bhw.sum() / (label_bhw != ignore_index).sum().clamp(min=1)
    return loss_bhw.mean()
