"""COCO evaluation of a Mask R-CNN (box and mask AP by COCOeval), and loading a ``detect`` run's detector."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

from a2mim.config import from_dict
from a2mim.data.coco import CocoInstances, coco_evaluate
from a2mim.detection import DetectorSpec, Input, build_detector, resolve_backend
from a2mim.train import checkpoint, engine
from a2mim.train.distributed import world_info

METRIC_NAMES = {"AP": "ap", "AP50": "ap50", "AP75": "ap75"}
IOU_SUFFIX = {"bbox": "box", "segm": "mask"}


def _subset_coco(coco: COCO, image_ids: list[int]) -> COCO:
    """A COCO index over ``image_ids`` only, for COCOeval on part of a validation set."""
    wanted = set(image_ids)
    data = dict(coco.dataset)
    data["images"] = [img for img in coco.dataset["images"] if img["id"] in wanted]
    data["annotations"] = [a for a in coco.dataset["annotations"] if a["image_id"] in wanted]
    sub = COCO()
    sub.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


# ----------------------------------------------------------------------------- evaluation


def to_coco_results(
    preds: list[dict[str, torch.Tensor]], image_ids: list[int], dataset: CocoInstances
) -> list[dict[str, Any]]:
    """COCO result dicts (``bbox`` xywh, compressed-RLE ``segmentation``, COCO category id)."""
    results = []
    for pred, image_id in zip(preds, image_ids, strict=True):
        boxes = pred["boxes"].float().cpu()
        masks = pred["masks"].cpu().numpy().astype(np.uint8)
        for box, score, label, mask_hw in zip(
            boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist(), masks, strict=True
        ):
            rle = mask_utils.encode(np.asfortranarray(mask_hw))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.label_to_cat_id(int(label)),
                    "score": float(score),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": rle,
                }
            )
    return results


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoInstances,
    device: torch.device,
    batch_size: int = 1,
    limit: int | None = None,
    amp_dtype: torch.dtype | None = None,
    evaluators: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Box and mask AP / AP50 / AP75 (percent) of ``model`` on ``dataset`` (its first
    ``limit`` images), by COCOeval. Each rank predicts a shard; rank 0's result covers all.
    Returns ``{"ap_box", "ap50_box", ..., "ap75_mask", "detections"}``; ``evaluators`` (when
    given) receives the COCOeval objects on rank 0 (:func:`a2mim.data.coco.coco_evaluate`)."""
    rank, world = world_info()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    shard = list(range(rank, count, world))
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    for start in engine.interruptible(range(0, len(shard), batch_size)):
        idx = shard[start : start + batch_size]
        images = [dataset.load_image(dataset.ids[i]).to(device) for i in idx]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(images)
        results += to_coco_results(preds, [dataset.ids[i] for i in idx], dataset)
    model.train(was_training)
    if world > 1:  # COCOeval on rank 0 only; the others get its metrics
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object(results, gathered, dst=0)
        results = [r for part in gathered for r in part] if rank == 0 else []
    metrics: dict[str, float] | None = None
    if rank == 0:
        ids = dataset.ids[:count]
        gt = dataset.coco if count == len(dataset) else _subset_coco(dataset.coco, ids)
        ap = coco_evaluate(gt, results, evaluators=evaluators)
        metrics = {
            f"{METRIC_NAMES[name]}_{IOU_SUFFIX[iou]}": value
            for key, value in ap.items()
            for iou, name in [key.split("/")]
        }
        metrics["detections"] = float(len(results))
    if world > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The detector stored in a ``detect`` run's ``model.pt``, in eval mode, with its ``meta``
    (backend, model spec, input sizes, classes, COCO category ids)."""
    saved = checkpoint.load(path)
    meta = saved["meta"]
    if meta.get("stage") != "detect":
        raise ValueError(f"{path} is from stage {meta.get('stage')!r}, not detect")
    spec = from_dict(DetectorSpec, meta["model"], f"{path}: meta.model")
    inputs = from_dict(Input, meta["input"], f"{path}: meta.input")
    model = build_detector(resolve_backend(meta["backend"]), spec, inputs, meta["num_classes"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval(), meta
