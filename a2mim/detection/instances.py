"""COCO training instances of the ``detect`` stage: the data section, seeded flips, the trainable images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from a2mim.config import bounded
from a2mim.data.coco import CocoInstances, clip_boxes, count_empty_boxes, drop_crowd
from a2mim.train.sampling import mix_seed

_log = logging.getLogger(__name__)
Target = dict[str, Any]


@dataclass(frozen=True)
class DataConfig:
    """A COCO-format instance set: annotation files and image folders relative to ``root``
    (defaults: the official COCO 2017 layout). ``val_limit`` evaluates on the first N
    validation images only (the ground truth is restricted to them)."""

    root: str = "data/coco"
    train_ann: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_ann: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    hflip: float = bounded(0.5, ge=0, le=1)
    filter_empty: bool = True
    val_limit: int | None = bounded(None, ge=1)
    eval_batch_size: int = bounded(1, ge=1)
    num_workers: int = bounded(0, ge=0)


class FlippedInstances(Dataset):
    """Training items of a `CocoInstances` subset: key ``(epoch, i)`` gives item
    ``indices[i]`` without crowd instances, flipped horizontally with probability ``p`` by a
    draw seeded from ``(seed, epoch, i)`` (so a resumed run sees the same flips)."""

    def __init__(self, dataset: CocoInstances, indices: list[int], p: float, seed: int):
        self.dataset, self.indices, self.p, self.seed = dataset, indices, p, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Target]:
        epoch, i = key
        img_chw, target = self.dataset[self.indices[i]]
        target, _ = clip_boxes(drop_crowd(target), *img_chw.shape[-2:])  # as detectron2
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
        if float(torch.rand(1, generator=gen)) < self.p:
            img_chw, target = hflip(img_chw, target)
        return img_chw, target


def hflip(img_chw: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror an image and its boxes (``x1, y1, x2, y2``), masks and polygons left-right."""
    width = img_chw.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    out = {**target, "boxes": boxes}
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if target.get("polygons") is not None:
        out["polygons"] = [
            None if polys is None else [_flip_x(p, width) for p in polys]
            for polys in target["polygons"]
        ]
    return img_chw.flip(-1), out


def _flip_x(polygon: np.ndarray, width: int) -> np.ndarray:
    flipped = polygon.copy()
    flipped[0::2] = width - polygon[0::2]
    return flipped


def collate(items: list[tuple[torch.Tensor, Target]]) -> tuple[list, list]:
    return [img for img, _ in items], [t for _, t in items]


def trainable_indices(dataset: CocoInstances, filter_empty: bool) -> list[int]:
    """Items with at least one non-crowd instance (detectron2's ``FILTER_EMPTY_ANNOTATIONS``),
    or all items."""
    if not filter_empty:
        return list(range(len(dataset)))
    skipped = set(dataset.skipped_ann_ids)
    keep = []
    for i, image_id in enumerate(dataset.ids):
        anns = dataset.coco.imgToAnns.get(image_id, [])
        if any(not a.get("iscrowd", 0) and a["id"] not in skipped for a in anns):
            keep.append(i)
    return keep


def count_empty_training_boxes(
    dataset: CocoInstances, indices: list[int], rank: int
) -> dict[str, int]:
    """`count_empty_boxes` over the training images, with a warning (rank 0) when any."""
    empty = count_empty_boxes(
        dataset.coco, [dataset.ids[i] for i in indices], dataset.skipped_ann_ids
    )
    if empty["empty_boxes"] and rank == 0:
        _log.warning(
            "%s: %d of %d training boxes are empty after clipping to the image (width or "
            "height <= 1e-5, in %d images) and are dropped, as detectron2's loader does",
            dataset.ann_file,
            empty["empty_boxes"],
            empty["annotations"],
            empty["images_affected"],
        )
    return empty
