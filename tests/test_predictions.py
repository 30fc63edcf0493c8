"""a2mim.predictions: file round trips, and each kind's metric recomputed from the stored
per-sample records equals the metric of the code that evaluates (COCOeval, SegMetrics) on the
full set and on a weighted (duplicated) set."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from a2mim import predictions as pr
from a2mim.stages.segment import SegMetrics


def test_classification_round_trip_and_weighted_top1(tmp_path):
    p = pr.classification(["a/1.png", "b/2.png", "c/3.png"], [0, 1, 2], [0, 2, 2], step=10)
    path = pr.write(pr.path_of(tmp_path), p)
    assert path == tmp_path / "predictions" / "final.npz"
    back = pr.read(path)
    assert back.kind == "classification" and back.meta == {"step": 10}
    assert list(back.ids) == ["a/1.png", "b/2.png", "c/3.png"]
    assert list(back.correct) == [True, False, True]
    assert back.score() == pytest.approx(200 / 3)
    assert back.score(np.array([0, 3, 1])) == pytest.approx(25.0)
    assert back.score(np.array([[0, 3, 1], [1, 0, 0]])) == pytest.approx([25.0, 100.0])
    assert not list(tmp_path.glob("predictions/.*"))  # no temp file left
    with pytest.raises(pr.PredictionsError, match="each sample needs all three"):
        pr.classification(["a"], [0, 1], [0, 1])


def test_reader_names_a_bad_file(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_text("not a zip")
    with pytest.raises(pr.PredictionsError, match="cannot read predictions file"):
        pr.read(bad)
    np.savez(tmp_path / "y.npz", kind=np.asarray("other"))
    with pytest.raises(pr.PredictionsError, match="not an a2mim predictions file"):
        pr.read(tmp_path / "y.npz")


def test_segmentation_miou_from_counts_equals_segmetrics():
    rng = np.random.default_rng(0)
    k, ignore = 5, 255
    preds = [rng.integers(0, k, (6, 7)) for _ in range(4)]
    labels = [rng.integers(0, k - 1, (6, 7)) for _ in range(4)]  # class 4 never labelled
    labels[0][0, :] = ignore
    counts = [
        pr.segmentation_counts(p, lab, k, ignore) for p, lab in zip(preds, labels, strict=False)
    ]
    seg = pr.segmentation(["i0", "i1", "i2", "i3"], [c[0] for c in counts], [c[1] for c in counts])
    metrics = SegMetrics(k, ignore)
    for p, lab in zip(preds, labels, strict=False):
        metrics.update(torch.as_tensor(p)[None], torch.as_tensor(lab)[None])
    assert seg.score() == pytest.approx(metrics.compute()["miou"], abs=1e-4)
    # weights: image 2 twice, image 3 left out
    dup = SegMetrics(k, ignore)
    for i in (0, 1, 2, 2):
        dup.update(torch.as_tensor(preds[i])[None], torch.as_tensor(labels[i])[None])
    assert seg.score(np.array([1, 1, 2, 0])) == pytest.approx(dup.compute()["miou"], abs=1e-4)
    rows = np.array([[1, 1, 2, 0], [1, 1, 1, 1]])
    assert seg.score(rows) == pytest.approx([seg.score(rows[0]), seg.score()])


def _coco(images, anns):
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in images],
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _scene(rng, n_images):
    """Ground truth boxes and noisy detections (some crowd, some missing, some false)."""
    anns, dets = [], []
    for img in range(1, n_images + 1):
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(10, 40, 2)
            cat = int(rng.integers(1, 4))
            anns.append({"image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.1)})  # fmt: skip
            if rng.random() < 0.8:
                jx, jy = rng.normal(0, 4, 2)
                dets.append({"image_id": img, "category_id": cat, "bbox": [x + jx, y + jy, w, h],
                             "score": float(rng.random())})  # fmt: skip
        for _ in range(rng.integers(0, 3)):
            dets.append({"image_id": img, "category_id": int(rng.integers(1, 4)),
                         "bbox": [*list(rng.uniform(0, 60, 2)), 20.0, 20.0],
                         "score": float(rng.random())})  # fmt: skip
    for i, a in enumerate(anns, start=1):
        a["id"] = i
    return anns, dets


def _cocoeval(gt, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_detection_ap_from_matches_equals_cocoeval_full_and_duplicated(tmp_path):
    rng = np.random.default_rng(3)
    n = 12
    anns, dets = _scene(rng, n)
    gt = _coco(range(1, n + 1), anns)
    ev = _cocoeval(gt, dets)
    det = pr.detection_from_cocoeval({"bbox": ev}, step=5)
    det = pr.read(pr.write(tmp_path / "d.npz", det))
    assert det.kind == "detection" and list(det.ids) == [str(i) for i in range(1, n + 1)]
    assert det.ap("bbox") == pytest.approx(100 * ev.stats[0], abs=1e-9)
    # a bootstrap-like draw: images 1-3 twice, 4-5 left out, as copies with new ids
    weights = np.ones(n, dtype=np.int64)
    weights[:3], weights[3:5] = 2, 0
    keep = [i for i in range(1, n + 1) if weights[i - 1] > 0]
    copies = {i: 100 + i for i in range(1, 4)}
    anns2 = [a for a in anns if a["image_id"] in keep]
    anns2 += [a | {"image_id": copies[a["image_id"]]} for a in anns if a["image_id"] in copies]
    for i, a in enumerate(anns2, start=1):
        a["id"] = i
    dets2 = [d for d in dets if d["image_id"] in keep]
    dets2 += [d | {"image_id": copies[d["image_id"]]} for d in dets if d["image_id"] in copies]
    ev2 = _cocoeval(_coco(keep + list(copies.values()), anns2), dets2)
    assert det.ap("bbox", weights) == pytest.approx(100 * ev2.stats[0], abs=1e-9)
    assert pr.score_for(det, "ap_box")(weights) == det.ap("bbox", weights)
    # many draws at once (the bootstrap's way) give each draw's AP
    batch = det.ap("bbox", np.stack([weights, np.ones(n), np.roll(weights, 5)]))
    singles = [det.ap("bbox", w) for w in (weights, np.ones(n), np.roll(weights, 5))]
    assert batch == pytest.approx(singles, abs=1e-9)
    with pytest.raises(pr.PredictionsError, match="no segm matches"):
        det.ap("segm")
    with pytest.raises(pr.PredictionsError, match="cannot give metric 'top1'"):
        pr.score_for(det, "top1")
