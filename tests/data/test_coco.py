"""COCO instance loader and evaluator: generated scenes, real labelme data, malformed files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from a2mim.config import ConfigError
from a2mim.data.coco import (
    CocoFormatError,
    CocoInstances,
    CocoLayoutError,
    clip_boxes,
    coco_evaluate,
    count_empty_boxes,
    drop_crowd,
    segmentation_to_mask,
    segmentation_to_rle,
    validate_root,
)
from a2mim.data.scenes import SceneComposer, make_scenes, scene_rng

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELME_COCO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"
)
SEED = 3
N_TRAIN = 10
IMG_SIZE = 96

pytestmark = pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason=f"Fashion-MNIST IDX files not found in {FMNIST_DIR}"
)


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two renderings of the same scenes: polygon and RLE segmentations."""
    root = tmp_path_factory.mktemp("coco_scenes")
    for mask_format in ("polygon", "rle"):
        make_scenes(
            root / mask_format,
            n_train=N_TRAIN,
            n_val=2,
            img_size=IMG_SIZE,
            seed=SEED,
            mask_format=mask_format,
        )
    return root


def _dataset(scene_root: Path, mask_format: str) -> CocoInstances:
    root = scene_root / mask_format / "coco"
    return CocoInstances(root / "annotations" / "instances_train2017.json", root / "train2017")


def _naive_uncompressed_rle(mask_hw: np.ndarray) -> list[int]:
    """Run lengths of the column-major flattened mask, starting with a run of zeros."""
    flat = mask_hw.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def _gt_as_detections(coco) -> list[dict]:
    detections = []
    for ann in coco.anns.values():
        info = coco.imgs[ann["image_id"]]
        rle = segmentation_to_rle(ann["segmentation"], info["height"], info["width"])
        detections.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": list(ann["bbox"]),
                "score": 1.0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
    return detections


# --- loading ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_format", ["polygon", "rle"])
def test_generated_set_targets(scene_root: Path, mask_format: str) -> None:
    dataset = _dataset(scene_root, mask_format)
    assert len(dataset) == N_TRAIN
    assert dataset.cat_ids == list(range(1, 11))
    assert dataset.class_names[0] == "T-shirt/top"
    for index in range(len(dataset)):
        img_chw, target = dataset[index]
        assert img_chw.shape == (3, IMG_SIZE, IMG_SIZE) and img_chw.dtype == torch.float32
        assert img_chw.min() >= 0.0 and img_chw.max() <= 1.0
        n = len(target["labels"])
        assert 1 <= n <= 3
        assert target["image_id"] == dataset.ids[index]
        assert target["masks"].shape == (n, IMG_SIZE, IMG_SIZE)
        assert target["masks"].dtype == torch.uint8
        assert target["labels"].dtype == torch.int64
        assert ((target["labels"] >= 1) & (target["labels"] <= 10)).all()
        assert target["iscrowd"].tolist() == [0] * n
        for mask_hw, box, area in zip(
            target["masks"].numpy(), target["boxes"], target["area"], strict=True
        ):
            rows, cols = np.nonzero(mask_hw)
            # A pixel (r, c) covers [c, c+1] x [r, r+1]: the tight box around the mask.
            expected = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert box.tolist() == pytest.approx(expected)
            assert area.item() == mask_hw.sum()


def test_masks_equal_pasted_silhouettes(scene_root: Path) -> None:
    """Both segmentation formats decode to exactly the silhouettes that were pasted."""
    composer = SceneComposer.from_sources("train", img_size=IMG_SIZE)
    polygon_set = _dataset(scene_root, "polygon")
    rle_set = _dataset(scene_root, "rle")
    ious = []
    for index in range(N_TRAIN):
        scene = composer.compose(scene_rng(SEED, "train", index))
        png_hwc = np.asarray(
            Image.open(scene_root / "rle" / "coco" / "train2017" / f"{index + 1:06d}.png")
        )
        np.testing.assert_array_equal(png_hwc, scene.image_hwc)
        union_hw = scene.masks_nhw.any(axis=0)
        # Pixels off the silhouettes are the untouched photo.
        np.testing.assert_array_equal(png_hwc[~union_hw], scene.background_hwc[~union_hw])
        for dataset in (rle_set, polygon_set):
            _, target = dataset[index]
            labels = target["labels"].numpy()
            np.testing.assert_array_equal(labels, scene.classes_n + 1)
            masks_nhw = target["masks"].numpy().astype(bool)
            np.testing.assert_array_equal(masks_nhw, scene.masks_nhw)
            for decoded, pasted in zip(masks_nhw, scene.masks_nhw, strict=True):
                ious.append((decoded & pasted).sum() / (decoded | pasted).sum())
    assert min(ious) == 1.0


def test_segmentation_to_mask_polygon_and_rle_forms() -> None:
    # Polygon along pixel edges: columns 2..4, rows 1..3 of a 6x8 image.
    mask_hw = segmentation_to_mask([[2, 1, 5, 1, 5, 4, 2, 4]], 6, 8)
    expected_hw = np.zeros((6, 8), dtype=np.uint8)
    expected_hw[1:4, 2:5] = 1
    np.testing.assert_array_equal(mask_hw, expected_hw)
    rng = np.random.default_rng(0)
    random_hw = (rng.random((7, 9)) < 0.4).astype(np.uint8)
    uncompressed = {"size": [7, 9], "counts": _naive_uncompressed_rle(random_hw)}
    np.testing.assert_array_equal(segmentation_to_mask(uncompressed, 7, 9), random_hw)
    compressed = segmentation_to_rle(uncompressed, 7, 9)
    as_text = {"size": [7, 9], "counts": compressed["counts"].decode()}
    np.testing.assert_array_equal(segmentation_to_mask(as_text, 7, 9), random_hw)


def test_uncompressed_rle_and_crowd(scene_root: Path, tmp_path: Path) -> None:
    source = scene_root / "rle" / "coco"
    data = json.loads((source / "annotations" / "instances_train2017.json").read_text())
    reference = _dataset(scene_root, "rle")
    ann = data["annotations"][0]
    crowd_mask_hw = reference.load_target(ann["image_id"])["masks"][0].numpy()
    ann["segmentation"] = {
        "size": [IMG_SIZE, IMG_SIZE],
        "counts": _naive_uncompressed_rle(crowd_mask_hw),
    }
    ann["iscrowd"] = 1
    ann_file = tmp_path / "crowd.json"
    ann_file.write_text(json.dumps(data))
    dataset = CocoInstances(ann_file, source / "train2017")
    _, target = dataset[dataset.ids.index(ann["image_id"])]
    np.testing.assert_array_equal(target["masks"][0].numpy(), crowd_mask_hw)
    assert target["iscrowd"][0] == 1
    kept = drop_crowd(target)
    n = len(target["labels"])
    assert len(kept["labels"]) == n - 1 and kept["iscrowd"].sum() == 0
    for key in ("boxes", "masks", "area", "labels"):
        assert torch.equal(kept[key], target[key][1:])
    assert kept["image_id"] == target["image_id"]


def test_degenerate_polygons_are_dropped(scene_root: Path, tmp_path: Path) -> None:
    source = scene_root / "polygon" / "coco"
    data = json.loads((source / "annotations" / "instances_train2017.json").read_text())
    reference = _dataset(scene_root, "polygon")
    first, second = data["annotations"][0], data["annotations"][1]
    first["segmentation"].append([1.0, 2.0, 3.0, 4.0])  # 2 points: a line, not a polygon
    second["segmentation"] = [[5.0, 5.0, 9.0, 9.0]]
    ann_file = _write(tmp_path / "degenerate.json", data)
    with pytest.warns(UserWarning, match=r"1 annotation\(s\) have only degenerate"):
        dataset = CocoInstances(ann_file, source / "train2017")
    assert dataset.skipped_ann_ids == [second["id"]]
    _, target = dataset[dataset.ids.index(first["image_id"])]
    _, expected = reference[reference.ids.index(first["image_id"])]
    assert torch.equal(target["masks"][0], expected["masks"][0])
    _, target = dataset[dataset.ids.index(second["image_id"])]
    _, expected = reference[reference.ids.index(second["image_id"])]
    assert len(target["labels"]) == len(expected["labels"]) - 1
    assert second["id"] in dataset.coco.anns  # still ground truth for evaluation


def test_transforms_are_applied(scene_root: Path) -> None:
    root = scene_root / "rle" / "coco"

    def flip(img_chw: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return img_chw.flip(-1), {**target, "masks": target["masks"].flip(-1)}

    plain = CocoInstances(root / "annotations" / "instances_train2017.json", root / "train2017")
    flipped = CocoInstances(
        root / "annotations" / "instances_train2017.json", root / "train2017", flip
    )
    assert torch.equal(flipped[0][0], plain[0][0].flip(-1))
    assert torch.equal(flipped[0][1]["masks"], plain[0][1]["masks"].flip(-1))


@pytest.mark.skipif(
    not LABELME_COCO.is_dir(),
    reason="Debian package labelme-examples is not installed (apt-get install labelme-examples)",
)
def test_real_labelme_annotations() -> None:
    dataset = CocoInstances(LABELME_COCO / "annotations.json", LABELME_COCO)
    assert len(dataset) == 3
    assert dataset.class_names[dataset.cat_ids.index(15)] == "person"
    instances = 0
    for index in range(len(dataset)):
        img_chw, target = dataset[index]
        info = dataset.coco.imgs[dataset.ids[index]]
        assert img_chw.shape == (3, info["height"], info["width"])
        for mask_hw, box, area in zip(
            target["masks"].numpy(), target["boxes"], target["area"], strict=True
        ):
            rows, cols = np.nonzero(mask_hw)
            x1, y1, x2, y2 = box.tolist()
            # labelme's boxes are the integer hull of the polygon; the raster lies inside.
            assert x1 - 1 <= cols.min() and cols.max() <= x2 + 1
            assert y1 - 1 <= rows.min() and rows.max() <= y2 + 1
            # labelme computes `area` with its own rasterizer; pycocotools' differs by a few
            # percent on the smallest object (815 vs 873 px).
            assert mask_hw.sum() == pytest.approx(area.item(), rel=0.1)
            instances += 1
    assert instances == 12
    # labelme numbers annotations from 0, which COCOeval would miscount without care.
    assert min(dataset.coco.anns) == 0
    metrics = coco_evaluate(dataset, _gt_as_detections(dataset.coco))
    assert metrics == pytest.approx(dict.fromkeys(metrics, 100.0))


# --- malformed files -------------------------------------------------------------------


def _copy_set(scene_root: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    source = scene_root / "polygon" / "coco"
    image_root = tmp_path / "images"
    shutil.copytree(source / "train2017", image_root)
    data = json.loads((source / "annotations" / "instances_train2017.json").read_text())
    return tmp_path / "instances.json", image_root, data


def _break_json(ann_file: Path, data: dict) -> None:
    ann_file.write_text(json.dumps(data)[:-40])


def _drop_categories(ann_file: Path, data: dict) -> None:
    del data["categories"]
    ann_file.write_text(json.dumps(data))


def _drop_bbox(ann_file: Path, data: dict) -> None:
    del data["annotations"][1]["bbox"]
    ann_file.write_text(json.dumps(data))


def _polygon_outside(ann_file: Path, data: dict) -> None:
    ann = data["annotations"][2]
    ann["segmentation"][0][0] = IMG_SIZE + 7.5
    ann_file.write_text(json.dumps(data))


def _unknown_category(ann_file: Path, data: dict) -> None:
    data["annotations"][0]["category_id"] = 99
    ann_file.write_text(json.dumps(data))


def _missing_image(ann_file: Path, data: dict) -> None:
    (ann_file.parent / "images" / data["images"][1]["file_name"]).unlink()
    ann_file.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("corrupt", "error", "fragments"),
    [
        (_break_json, CocoFormatError, ["invalid JSON", "line 1, column"]),
        (_drop_categories, CocoFormatError, ["'categories'"]),
        (_drop_bbox, CocoFormatError, ["annotations[1]", "'bbox'"]),
        (_polygon_outside, CocoFormatError, ["annotation id=3", "image id=", f"0..{IMG_SIZE}"]),
        (_unknown_category, CocoFormatError, ["annotation id=1", "category_id=99"]),
        (_missing_image, FileNotFoundError, ["image file missing", "000002.png"]),
    ],
)
def test_malformed_files_name_the_file(
    scene_root: Path, tmp_path: Path, corrupt, error: type, fragments: list[str]
) -> None:
    ann_file, image_root, data = _copy_set(scene_root, tmp_path)
    CocoInstances(_write(ann_file, data), image_root)  # the intact copy loads
    corrupt(ann_file, copy.deepcopy(data))
    with pytest.raises(error) as info:
        CocoInstances(ann_file, image_root)
    message = str(info.value)
    assert str(ann_file) in message
    for fragment in fragments:
        assert fragment in message


def _write(ann_file: Path, data: dict) -> Path:
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_image_size_differing_from_json_is_reported(scene_root: Path, tmp_path: Path) -> None:
    ann_file, image_root, data = _copy_set(scene_root, tmp_path)
    data["images"][0]["width"] = IMG_SIZE + 1
    dataset = CocoInstances(_write(ann_file, data), image_root, polygon_tolerance=2.0)
    with pytest.raises(CocoFormatError, match=r"000001\.png"):
        dataset[0]


# --- evaluation ------------------------------------------------------------------------


def test_evaluate_ground_truth_and_empty(scene_root: Path) -> None:
    dataset = _dataset(scene_root, "polygon")
    metrics = coco_evaluate(dataset, _gt_as_detections(dataset.coco))
    assert set(metrics) == {f"{t}/{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75")}
    assert metrics == pytest.approx(dict.fromkeys(metrics, 100.0))
    assert coco_evaluate(dataset, []) == dict.fromkeys(metrics, 0.0)
    # The same ground truth numbered from 0 (as labelme writes it) still scores 100.
    data = copy.deepcopy(dataset.coco.dataset)
    for ann in data["annotations"]:
        ann["id"] -= 1
    shifted = COCO()
    shifted.dataset = data
    shifted.createIndex()
    assert min(shifted.anns) == 0
    assert coco_evaluate(shifted, _gt_as_detections(shifted), ("segm",)) == {
        "segm/AP": 100.0,
        "segm/AP50": 100.0,
        "segm/AP75": 100.0,
    }


def _hand_made_set(tmp_path: Path) -> Path:
    """One 20x20 image: two instances of category 5, one of category 7."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    boxes = {1: (5, [0, 0, 10, 10]), 2: (5, [12, 12, 6, 6]), 3: (7, [0, 12, 8, 8])}
    data = {
        "images": [{"id": 4, "file_name": "a.png", "height": 20, "width": 20}],
        "categories": [{"id": 5, "name": "five"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {
                "id": ann_id,
                "image_id": 4,
                "category_id": cat,
                "bbox": box,
                "area": float(box[2] * box[3]),
                "iscrowd": 0,
                "segmentation": [
                    [
                        box[0],
                        box[1],
                        box[0] + box[2],
                        box[1],
                        box[0] + box[2],
                        box[1] + box[3],
                        box[0],
                        box[1] + box[3],
                    ]
                ],
            }
            for ann_id, (cat, box) in boxes.items()
        ],
    }
    return _write(tmp_path / "hand.json", data)


def test_evaluate_golden_values(tmp_path: Path) -> None:
    ann_file = _hand_made_set(tmp_path)
    CocoInstances(ann_file, tmp_path)  # valid
    recall_points = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall thresholds

    # Category 5: one of two instances found (recall 1/2, precision 1); category 7: a false
    # positive scored above the true positive (precision 1/2 at recall 1).
    detections = [
        {"image_id": 4, "category_id": 5, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 4, "category_id": 7, "bbox": [10, 0, 8, 8], "score": 0.8},
        {"image_id": 4, "category_id": 7, "bbox": [0, 12, 8, 8], "score": 0.7},
    ]
    ap_five = (recall_points <= 0.5).mean()
    ap_seven = 0.5
    expected = 100.0 * (ap_five + ap_seven) / 2
    metrics = coco_evaluate(ann_file, detections, ("bbox",))
    assert metrics == pytest.approx(
        {"bbox/AP": expected, "bbox/AP50": expected, "bbox/AP75": expected}
    )

    # IoU 0.625 with the ground truth: a hit at thresholds 0.50, 0.55, 0.60 of the ten.
    partial = [{"image_id": 4, "category_id": 7, "bbox": [0, 12, 8, 5], "score": 1.0}]
    metrics = coco_evaluate(ann_file, partial, ("bbox",))
    assert metrics == pytest.approx(
        {"bbox/AP": 100.0 * 0.3 / 2, "bbox/AP50": 100.0 / 2, "bbox/AP75": 0.0}
    )


def test_evaluate_rejects_unknown_ids(tmp_path: Path) -> None:
    ann_file = _hand_made_set(tmp_path)
    good = {"image_id": 4, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1.0}
    with pytest.raises(ValueError, match="category_id=3"):
        coco_evaluate(ann_file, [{**good, "category_id": 3}], ("bbox",))
    with pytest.raises(ValueError, match="image_id=9"):
        coco_evaluate(ann_file, [{**good, "image_id": 9}], ("bbox",))
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(ann_file, [good], ("segm",))


# ----------------------------------------------------------------------------- layout, boxes


def test_validate_root_accepts_coco2017_and_names_the_layout(
    scene_root: Path, tmp_path: Path
) -> None:
    root = scene_root / "polygon" / "coco"  # the scenes write the COCO 2017 layout
    summary = validate_root(root)
    assert summary["val_images"] == 2 and summary["categories"] == 10
    assert issubclass(CocoLayoutError, ConfigError)
    with pytest.raises(CocoLayoutError, match=r"not a folder; expected the COCO 2017 layout"):
        validate_root(tmp_path / "nowhere")
    broken = tmp_path / "coco"
    shutil.copytree(root, broken)
    (broken / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(
        CocoLayoutError, match=r"missing annotations/instances_train2017\.json; expected"
    ):
        validate_root(broken)
    shutil.copy(root / "annotations" / "instances_train2017.json", broken / "annotations")
    first = json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"][0]
    image = broken / "val2017" / first["file_name"]
    Image.open(image).resize((7, 5)).save(image)
    with pytest.raises(CocoLayoutError, match=r"is 7x5 \(WxH\) but .* declares"):
        validate_root(broken)
    image.unlink()
    with pytest.raises(CocoLayoutError, match=r"first image .* is not in"):
        validate_root(broken)


def test_clip_boxes_drops_empty_boxes_as_detectron2() -> None:
    target = {
        "boxes": torch.tensor(
            [[2.0, 3.0, 8.0, 9.0], [5.0, 1.0, 5.0, 4.0], [-3.0, 2.0, 12.0, 2.0], [8.0, 8, 15, 20]]
        ),
        "labels": torch.tensor([1, 2, 3, 4]),
        "masks": torch.zeros(4, 10, 10, dtype=torch.uint8),
        "iscrowd": torch.zeros(4, dtype=torch.int64),
        "polygons": [[np.zeros(6)], None, [np.ones(6)], [np.full(6, 2.0)]],
    }
    kept, dropped = clip_boxes(target, height=10, width=10)
    assert dropped == 2  # zero width, zero height
    assert kept["boxes"].tolist() == [[2.0, 3.0, 8.0, 9.0], [8.0, 8.0, 10.0, 10.0]]
    assert kept["labels"].tolist() == [1, 4] and kept["masks"].shape == (2, 10, 10)
    assert [p[0][0] for p in kept["polygons"]] == [0.0, 2.0]
    same, none = clip_boxes(kept, height=10, width=10)
    assert none == 0 and torch.equal(same["boxes"], kept["boxes"])


def test_count_empty_boxes_and_polygon_targets(scene_root: Path, tmp_path: Path) -> None:
    source = scene_root / "polygon" / "coco"
    data = json.loads((source / "annotations" / "instances_train2017.json").read_text())
    data["annotations"][0]["bbox"][2] = 0.0  # zero width, as in COCO train2017
    data["annotations"][1]["bbox"][3] = 0.0  # zero height
    ann_file = _write(tmp_path / "instances.json", data)
    dataset = CocoInstances(ann_file, source / "train2017", with_polygons=True)
    counts = count_empty_boxes(dataset.coco, dataset.ids)
    assert counts == {
        "annotations": len(data["annotations"]),
        "empty_boxes": 2,
        "images_affected": len({a["image_id"] for a in data["annotations"][:2]}),
    }
    _, target = dataset[0]
    polygons = target["polygons"]
    assert len(polygons) == len(target["labels"]) and all(len(p) >= 1 for p in polygons)
    assert polygons[0][0].dtype == np.float64
    assert "masks" not in target  # every instance has polygons: no bitmap decoded
    assert "polygons" not in _dataset(scene_root, "polygon")[0][1]


def test_sixteen_bit_grayscale_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768], [40000, 65279, 65535, 128]], dtype=np.uint16)
    (tmp_path / "train2017").mkdir()
    Image.fromarray(values).save(tmp_path / "train2017" / "deep.png")  # a real 16-bit PNG
    with Image.open(tmp_path / "train2017" / "deep.png") as raw:
        assert raw.mode.startswith("I")
    ann = {
        "images": [{"id": 1, "file_name": "deep.png", "width": 4, "height": 2}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 2, 1],
                "area": 2,
                "iscrowd": 0,
                "segmentation": [[0, 0, 2, 0, 2, 1, 0, 1]],
            }
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    ann_file = tmp_path / "instances_train2017.json"
    ann_file.write_text(json.dumps(ann))
    img_chw = CocoInstances(ann_file, tmp_path / "train2017").load_image(1)
    expected = np.array([[0, 1, 4, 128], [156, 254, 255, 0]]) / 255.0  # round(v / 257)
    for channel in img_chw:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)
