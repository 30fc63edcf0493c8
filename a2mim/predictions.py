"""Per-sample predictions of one evaluation: what paired statistics need (:mod:`a2mim.statistics`).

One ``.npz`` file per evaluation (numpy's zip of arrays, no pickles), written atomically by rank
0 into the run folder (``predictions/<name>.npz``) and logged as an MLflow artifact under
``predictions/``. Every file holds ``kind`` (``classification``, ``detection``,
``segmentation``), ``format`` (:data:`FORMAT_VERSION`), ``meta`` (JSON text: step, epoch, split,
...), ``ids`` (one per sample: an image's path relative to its split folder, a COCO image id as
text, an ADE20K file stem) and the arrays of its kind:

``classification`` (finetune, linprobe)
    ``label`` (n,) true class, ``pred`` (n,) predicted class (arg-max), so ``correct = pred ==
    label``; top-1 is its mean.
``segmentation`` (segment)
    ``intersection`` and ``union`` (n, K): per image and class the pixels predicted *and*
    labelled c, and predicted *or* labelled c (ignored pixels excluded). mIoU over any weighting
    of the images is ``mean_c(sum_i w_i I_ic / sum_i w_i U_ic)`` over classes with a union.
``detection`` (detect), per IoU type ``t`` in ``bbox``/``segm`` (``<t>_`` prefixed arrays)
    COCOeval's per-image matching (area "all", at most 100 detections per image):
    ``<t>_det_image``, ``<t>_det_category`` (indices into ``ids`` / ``categories``),
    ``<t>_det_score``, ``<t>_det_tp`` and ``<t>_det_fp`` (d, T) per IoU threshold (a detection
    matched to an ignored ground truth is neither), ``<t>_gt_count`` (n, K) non-ignored ground
    truth per image and category; ``iou_thresholds`` (T,), ``categories`` (K,) COCO ids. AP over
    any weighting of the images is COCOeval's accumulate on the weighted matches
    (:meth:`DetectionPredictions.ap`): for uniform weights it equals COCOeval's AP.

A reader gets an object with ``ids`` and ``score(weights)``, the metric (percent) over the
samples weighted by ``weights`` (a bootstrap draw's multiplicities; None: the full set); weight
rows ``(r, n)`` give ``r`` draws' metrics at once.

Files per run: ``final.npz`` (the final evaluation, every stage) and, for fine-tuning,
``best_last10.npz`` (the evaluation with the best top-1 of the last 10 epochs); classification
runs also keep ``epoch_<e>.npz`` of the evaluations they choose from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from a2mim import atomic

FORMAT_VERSION = 1
FOLDER = "predictions"
FINAL = "final"  # the file of a run's final evaluation: predictions/final.npz
BEST_LAST10 = "best_last10"  # fine-tuning: the evaluation with the best top-1 of the last 10
LAST_EPOCHS = 10  # the window of the authors' fine-tuning rule
KINDS = ("classification", "detection", "segmentation")
IOU_TYPES = ("bbox", "segm")
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs


class PredictionsError(ValueError):
    """A predictions file that cannot be read or used; the message names it and the fix."""


def path_of(run_dir: str | Path, name: str = FINAL) -> Path:
    return Path(run_dir) / FOLDER / f"{name}.npz"


# ---------------------------------------------------------------------------------------------
# The three kinds


@dataclass(frozen=True)
class ClassificationPredictions:
    ids: np.ndarray  # (n,) str
    label: np.ndarray  # (n,) int
    pred: np.ndarray  # (n,) int
    meta: Mapping[str, Any]
    kind = "classification"
    metric = "top1"

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    def score(self, weights: np.ndarray | None = None) -> float | np.ndarray:
        """Top-1 in percent over the weighted samples (see :func:`_rows`)."""
        w, one = _rows(weights, len(self.ids))
        out = 100.0 * (w @ self.correct.astype(np.float64)) / w.sum(axis=1)
        return float(out[0]) if one else out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"label": self.label, "pred": self.pred}


@dataclass(frozen=True)
class SegmentationPredictions:
    ids: np.ndarray  # (n,) str
    intersection: np.ndarray  # (n, K) int64
    union: np.ndarray  # (n, K) int64
    meta: Mapping[str, Any]
    kind = "segmentation"
    metric = "miou"

    def score(self, weights: np.ndarray | None = None) -> float | np.ndarray:
        """mIoU in percent: per-class IoU of the weighted sums, mean over classes that have a
        union (as mmseg's nanmean and torchmetrics' macro Jaccard); see :func:`_rows`."""
        w, one = _rows(weights, len(self.ids))
        inter, union = w @ self.intersection, w @ self.union  # (r, K)
        present = union > 0
        iou = np.where(present, inter / np.maximum(union, 1), 0.0)
        with np.errstate(invalid="ignore"):
            out = 100.0 * iou.sum(axis=1) / present.sum(axis=1)
        return float(out[0]) if one else out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"intersection": self.intersection, "union": self.union}


@dataclass(frozen=True)
class DetectionMatches:
    """COCOeval's matches of one IoU type (see the module docstring)."""

    det_image: np.ndarray  # (d,) int
    det_category: np.ndarray  # (d,) int
    det_score: np.ndarray  # (d,) float
    det_tp: np.ndarray  # (d, T) bool
    det_fp: np.ndarray  # (d, T) bool
    gt_count: np.ndarray  # (n, K) int


@dataclass(frozen=True)
class DetectionPredictions:
    ids: np.ndarray  # (n,) str: COCO image ids
    categories: np.ndarray  # (K,) COCO category ids
    iou_thresholds: np.ndarray  # (T,)
    matches: Mapping[str, DetectionMatches]  # by IoU type
    meta: Mapping[str, Any]
    kind = "detection"
    metric = "ap_box"

    def ap(self, iou_type: str = "bbox", weights: np.ndarray | None = None) -> float | np.ndarray:
        """COCO AP (percent, IoU .50:.95, area all, 100 detections) over the weighted images
        (see :func:`_rows`)."""
        if iou_type not in self.matches:
            raise PredictionsError(f"no {iou_type} matches stored (have {sorted(self.matches)})")
        return weighted_ap(self.matches[iou_type], weights)

    def score(self, weights: np.ndarray | None = None, iou_type: str = "bbox"):
        return self.ap(iou_type, weights)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"categories": self.categories, "iou_thresholds": self.iou_thresholds}
        for t, m in self.matches.items():
            for field in DetectionMatches.__dataclass_fields__:
                out[f"{t}_{field}"] = getattr(m, field)
        return out


Predictions = ClassificationPredictions | DetectionPredictions | SegmentationPredictions


def _rows(weights: np.ndarray | None, n: int) -> tuple[np.ndarray, bool]:
    """Weights as rows ``(r, n)`` of float64, and whether the caller gave one set (None: all
    ones; a 1-d array: one draw) and so wants a float back rather than ``(r,)`` scores."""
    if weights is None:
        return np.ones((1, n)), True
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[-1] != n or w.ndim not in (1, 2):
        raise PredictionsError(f"weights of shape {w.shape} for {n} samples")
    return (w[None], True) if w.ndim == 1 else (w, False)


_AP_CHUNK = 2_000_000  # draws x detections x IoU thresholds per array of the batched AP


def weighted_ap(m: DetectionMatches, weights: np.ndarray | None = None) -> float | np.ndarray:
    """COCOeval's ``accumulate`` (then AP = mean precision over recall thresholds, IoUs and
    categories with ground truth) with image ``weights``: an image drawn ``w`` times counts each
    of its detections and ground truths ``w`` times. Detections are ranked by score as COCOeval
    does (a stable sort of the per-image lists in image order), so for all-ones weights the
    result equals COCOeval's AP; ties between copies of one image keep their order.

    ``weights``: None, one draw ``(n,)`` (a float back) or many ``(r, n)`` (``(r,)`` back)."""
    w, one = _rows(weights, m.gt_count.shape[0])
    n_gt = w @ m.gt_count  # (r, K)
    n_iou = m.det_tp.shape[1]
    total = np.zeros(len(w))  # sum over (category, IoU) with ground truth of the mean precision
    count = (n_gt > 0).sum(axis=1) * n_iou
    for k in range(m.gt_count.shape[1]):
        sel = np.flatnonzero(m.det_category == k)
        order = sel[np.argsort(-m.det_score[sel], kind="mergesort")]
        step = max(1, _AP_CHUNK // max(1, len(order) * n_iou))
        for lo in range(0, len(w), step):
            chunk = slice(lo, lo + step)
            q = _precision_at_recalls(
                w[chunk][:, m.det_image[order]], m.det_tp[order], m.det_fp[order], n_gt[chunk, k]
            )  # (r, T, R)
            total[chunk] += np.where(n_gt[chunk, k] > 0, q.mean(axis=2).sum(axis=1), 0.0)
    with np.errstate(invalid="ignore"):
        ap = 100.0 * total / count
    return float(ap[0]) if one else ap


def _precision_at_recalls(
    dw: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray
) -> np.ndarray:
    """COCOeval's interpolated precision at its 101 recall thresholds (0 beyond the last), for
    ``r`` draws at once: detection weights ``dw`` (r, d) in rank order, matches ``tp``/``fp``
    (d, T), ground truth counts ``n_gt`` (r,); returns (r, T, R). A detection of weight 0 keeps
    the cumulative counts of the one before it, which changes no interpolated precision."""
    r, d = dw.shape
    t, thresholds = tp.shape[1], RECALL_THRESHOLDS
    if d == 0:
        return np.zeros((r, t, len(thresholds)))
    tps = np.cumsum(dw[:, :, None] * tp[None], axis=1)  # (r, d, T)
    fps = np.cumsum(dw[:, :, None] * fp[None], axis=1)
    # recall in [0, 1] (0 for a draw without ground truth, which the caller leaves out), as
    # the sorted-rows trick below needs
    rc = np.clip(tps / np.maximum(n_gt, 1e-12)[:, None, None], 0.0, 1.0)
    pr = tps / (fps + tps + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
    # searchsorted(rc[b, :, t], thresholds, "left") for every (b, t) at once: rows of
    # non-decreasing recalls in [0, 1] shifted by 2 per row form one sorted array
    rows = np.transpose(rc, (0, 2, 1)).reshape(r * t, d)
    offset = 2.0 * np.arange(r * t)[:, None]
    inds = np.searchsorted((rows + offset).ravel(), (thresholds[None] + offset).ravel(), "left")
    inds = inds.reshape(r * t, len(thresholds)) - d * np.arange(r * t)[:, None]
    env = np.transpose(pr, (0, 2, 1)).reshape(r * t, d)
    q = np.where(inds < d, np.take_along_axis(env, np.minimum(inds, d - 1), axis=1), 0.0)
    return q.reshape(r, t, len(thresholds))


# ---------------------------------------------------------------------------------------------
# Builders (from what an evaluation has)


def classification(
    ids: Sequence[str], label: Sequence[int], pred: Sequence[int], **meta: Any
) -> ClassificationPredictions:
    label_a, pred_a = np.asarray(label, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    ids_a = np.asarray([str(i) for i in ids])
    if not len(ids_a) == len(label_a) == len(pred_a):
        raise PredictionsError(
            f"classification predictions: {len(ids_a)} ids, {len(label_a)} labels and "
            f"{len(pred_a)} predictions; each sample needs all three"
        )
    return ClassificationPredictions(ids_a, label_a, pred_a, meta)


def segmentation_counts(
    pred_hw: np.ndarray, label_hw: np.ndarray, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union pixel counts ``(K,)`` of one image, ignored pixels out."""
    pred, label = np.asarray(pred_hw).ravel(), np.asarray(label_hw).ravel()
    valid = label != ignore_index
    pred, label = pred[valid].astype(np.int64), label[valid].astype(np.int64)
    hit = np.bincount(label[pred == label], minlength=num_classes)[:num_classes]
    labelled = np.bincount(label, minlength=num_classes)[:num_classes]
    predicted = np.bincount(pred, minlength=num_classes)[:num_classes]
    return hit, labelled + predicted - hit


def segmentation(
    ids: Sequence[str], intersection: np.ndarray, union: np.ndarray, **meta: Any
) -> SegmentationPredictions:
    inter, uni = np.asarray(intersection, np.int64), np.asarray(union, np.int64)
    if inter.shape != uni.shape or inter.ndim != 2 or inter.shape[0] != len(ids):
        raise PredictionsError(
            f"segmentation predictions: intersection {inter.shape} and union {uni.shape} must "
            f"both be (images={len(ids)}, classes)"
        )
    return SegmentationPredictions(np.asarray([str(i) for i in ids]), inter, uni, meta)


def detection_from_cocoeval(evaluators: Mapping[str, Any], **meta: Any) -> DetectionPredictions:
    """The per-image matches of pycocotools ``COCOeval`` objects (after ``evaluate()``), by IoU
    type; area range "all" and the largest ``maxDets`` (COCOeval's AP setting)."""
    if not evaluators:
        raise PredictionsError("detection predictions need at least one COCOeval")
    first = next(iter(evaluators.values())).params
    image_ids, cat_ids = list(first.imgIds), list(first.catIds)
    matches = {}
    for iou_type, ev in evaluators.items():
        p = ev.params
        if list(p.imgIds) != image_ids or list(p.catIds) != cat_ids:
            raise PredictionsError("the COCOeval objects of one evaluation must share images")
        matches[iou_type] = _matches(ev, len(image_ids), len(cat_ids))
    return DetectionPredictions(
        np.asarray([str(i) for i in image_ids]),
        np.asarray(cat_ids, dtype=np.int64),
        np.asarray(first.iouThrs, dtype=np.float64),
        matches,
        meta,
    )


def _matches(ev: Any, n_images: int, n_cats: int) -> DetectionMatches:
    p = ev.params
    n_areas, max_det, n_iou = len(p.areaRng), p.maxDets[-1], len(p.iouThrs)
    images, cats, scores, tps, fps = [], [], [], [], []
    gt_count = np.zeros((n_images, n_cats), dtype=np.int64)
    for k in range(n_cats):
        for i in range(n_images):
            e = ev.evalImgs[k * n_areas * n_images + i]  # area index 0: "all"
            if e is None:
                continue
            gt_count[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = min(len(e["dtScores"]), max_det)
            if d == 0:
                continue
            matched = np.asarray(e["dtMatches"])[:, :d] > 0
            ignored = np.asarray(e["dtIgnore"])[:, :d].astype(bool)
            images.append(np.full(d, i))
            cats.append(np.full(d, k))
            scores.append(np.asarray(e["dtScores"][:d], dtype=np.float64))
            tps.append((matched & ~ignored).T)
            fps.append((~matched & ~ignored).T)

    def cat(parts: list, shape: tuple, dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

    return DetectionMatches(
        cat(images, (0,), np.int64).astype(np.int64),
        cat(cats, (0,), np.int64).astype(np.int64),
        cat(scores, (0,), np.float64),
        cat(tps, (0, n_iou), bool),
        cat(fps, (0, n_iou), bool),
        gt_count,
    )


# ---------------------------------------------------------------------------------------------
# Files


def write(path: str | Path, predictions: Predictions) -> Path:
    """Write ``predictions`` to ``path`` (``.npz``) atomically; returns the path."""
    path = Path(path)
    arrays = {
        "kind": np.asarray(predictions.kind),
        "format": np.asarray(FORMAT_VERSION),
        "meta": np.asarray(json.dumps(dict(predictions.meta), default=str)),
        "ids": predictions.ids,
        **predictions.arrays(),
    }
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def read(path: str | Path) -> Predictions:
    """The predictions in ``path`` (written by :func:`write`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise PredictionsError(
            f"cannot read predictions file {path} ({exc}); rerun the evaluation that wrote it"
        ) from None
    kind = str(arrays.get("kind", ""))
    version = int(arrays["format"]) if "format" in arrays else None
    if kind not in KINDS or version != FORMAT_VERSION:
        raise PredictionsError(
            f"{path}: kind {kind!r}, format {version}: not an a2mim predictions file of format "
            f"{FORMAT_VERSION} (kinds {', '.join(KINDS)})"
        )
    meta = json.loads(str(arrays["meta"]))
    ids = arrays["ids"]
    try:
        if kind == "classification":
            return ClassificationPredictions(ids, arrays["label"], arrays["pred"], meta)
        if kind == "segmentation":
            return SegmentationPredictions(ids, arrays["intersection"], arrays["union"], meta)
        matches = {
            t: DetectionMatches(
                **{f: arrays[f"{t}_{f}"] for f in DetectionMatches.__dataclass_fields__}
            )
            for t in IOU_TYPES
            if f"{t}_gt_count" in arrays
        }
        return DetectionPredictions(
            ids, arrays["categories"], arrays["iou_thresholds"], matches, meta
        )
    except KeyError as exc:
        raise PredictionsError(f"{path}: {kind} predictions lack array {exc}") from None


def score_for(predictions: Predictions, metric: str):
    """The per-weights score function of ``metric`` (``top1``, ``ap_box``, ``ap_mask``,
    ``miou``) on ``predictions``; raises PredictionsError when the file cannot give it."""
    wanted = {"top1": "classification", "miou": "segmentation"}
    wanted |= {"ap_box": "detection", "ap_mask": "detection"}
    if wanted.get(metric) != predictions.kind:
        raise PredictionsError(f"{predictions.kind} predictions cannot give metric {metric!r}")
    if metric in ("ap_box", "ap_mask"):
        iou_type = "bbox" if metric == "ap_box" else "segm"
        return lambda w: predictions.ap(iou_type, w)
    return predictions.score


def gather(local: list[Any]) -> list[Any]:
    """Every rank's list concatenated in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


# ---------------------------------------------------------------------------------------------
# What the stages call (every rank calls; rank 0 writes)


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def image_folder_id(dataset: Any, index: int) -> str:
    """A sample's id in an ImageFolder split: its path relative to ``root/split``."""
    path = Path(dataset.samples[index][0])
    base = Path(dataset.root) / dataset.split
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def save_classification(
    path: str | Path,
    dataset: Any,
    indices: Sequence[int],
    result: Mapping[str, Any],
    rank: int,
    **meta: Any,
) -> Path | None:
    """Gather every rank's shard of an evaluation (``indices`` into the ImageFolder
    ``dataset``; ``result`` from ``evaluate(..., collect=True)``) and, on rank 0, write the
    classification predictions to ``path``. A collective: call it on every rank."""
    label, pred = result["label"].tolist(), result["pred"].tolist()
    if len(label) != len(indices):
        raise PredictionsError(
            f"{len(label)} predictions for a shard of {len(indices)} samples: the evaluation "
            "loader must not shuffle or drop samples"
        )
    rows = gather([(int(i), lab, p) for i, lab, p in zip(indices, label, pred, strict=True)])
    if rank != 0:
        return None
    rows.sort()
    ids = [image_folder_id(dataset, i) for i, _, _ in rows]
    preds = classification(ids, [r[1] for r in rows], [r[2] for r in rows], **meta)
    return write(path, preds)


def save_segmentation(
    path: str | Path,
    ids: Sequence[str],
    counts: Sequence[tuple[int, np.ndarray, np.ndarray]],
    rank: int,
    **meta: Any,
) -> Path | None:
    """Gather every rank's per-image ``(index, intersection, union)`` counts and, on rank 0,
    write the segmentation predictions (``ids[index]`` names image ``index``). A collective."""
    rows = sorted(gather(list(counts)), key=lambda r: r[0])
    if rank != 0:
        return None
    preds = segmentation(
        [ids[i] for i, _, _ in rows],
        np.stack([r[1] for r in rows]),
        np.stack([r[2] for r in rows]),
        **meta,
    )
    return write(path, preds)


def best_of_last(
    jsonl: str | Path, epochs: int, window: int = LAST_EPOCHS, key: str = "top1"
) -> tuple[float, int] | None:
    """The best ``key`` of the evaluations of the last ``window`` epochs in a stage's
    ``metrics.jsonl`` (evaluation lines carry an integer ``epoch``), and its epoch; None when
    none was evaluated there. Read from the file, so a resumed run counts every evaluation."""
    best: tuple[float, int] | None = None
    for line in Path(jsonl).read_text().splitlines():
        row = json.loads(line)
        epoch = row.get("epoch")
        if key not in row or not isinstance(epoch, int) or epoch <= epochs - window:
            continue
        if best is None or row[key] > best[0]:
            best = (float(row[key]), epoch)
    return best


def finish_classification(
    out: str | Path,
    epochs: int,
    final: Mapping[str, float],
    tracker: Any,
    step: int,
    best_last: bool = False,
) -> dict[str, float]:
    """Rank 0, after the final evaluation of a classification run in ``out``: copy its
    predictions to ``predictions/final.npz``; with ``best_last`` (fine-tuning: the authors
    report the best top-1 of the last 10 epochs) also find that evaluation in
    ``metrics.jsonl`` and copy its predictions to ``predictions/best_last10.npz``. Logs the
    files as MLflow artifacts (``predictions/``) and the returned metrics at ``step``:
    ``top1_final`` and, with ``best_last``, ``top1_best_last10`` and ``top1_best_last10_epoch``."""
    out = Path(out)
    metrics = {"top1_final": float(final["top1"])}
    chosen = {FINAL: epochs}
    if best_last:
        best = best_of_last(out / "metrics.jsonl", epochs)
        if best is None:  # cannot happen: the final evaluation is in the window
            raise PredictionsError(f"{out}/metrics.jsonl holds no evaluation of the last epochs")
        metrics["top1_best_last10"], metrics["top1_best_last10_epoch"] = best[0], float(best[1])
        chosen[BEST_LAST10] = best[1]
    for name, epoch in chosen.items():
        source = path_of(out, epoch_name(epoch))
        if not source.is_file():
            raise PredictionsError(f"missing {source}: the evaluation of epoch {epoch} wrote none")
        with atomic.atomic_path(path_of(out, name)) as tmp:
            shutil.copyfile(source, tmp)
        tracker.log_artifact(path_of(out, name), FOLDER)
    tracker.log_metrics(metrics, step)
    return metrics


__all__ = [
    "BEST_LAST10",
    "FINAL",
    "ClassificationPredictions",
    "DetectionPredictions",
    "PredictionsError",
    "SegmentationPredictions",
    "classification",
    "detection_from_cocoeval",
    "path_of",
    "read",
    "score_for",
    "segmentation",
    "segmentation_counts",
    "weighted_ap",
    "write",
]
