"""Scene generator: determinism, counts, atomic writes, exact masks, ADE/COCO agreement."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from a2mim.data.ade import ADE20KSegmentation
from a2mim.data.coco import CocoInstances, segmentation_to_mask
from a2mim.data.scenes import (
    ADE_NUM_CLASSES,
    FASHION_MNIST_CLASSES,
    SceneComposer,
    _read_idx,
    make_scenes,
    mask_to_polygons,
    scene_rng,
    semantic_label,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason=f"Fashion-MNIST IDX files not found in {FMNIST_DIR}"
)
SMALL = {"n_train": 6, "n_val": 3, "img_size": 96, "seed": 11}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("scenes") / "set"
    manifest = make_scenes(out_dir, **SMALL)
    return out_dir, manifest


# --- IDX reader -------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, dtype_code: int = 0x08) -> None:
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(">u1").tobytes())


def test_read_idx_round_trip_and_prefix(tmp_path: Path) -> None:
    images_nhw = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    _write_idx(tmp_path / "x.gz", images_nhw)
    np.testing.assert_array_equal(_read_idx(tmp_path / "x.gz", ndim=3), images_nhw)
    np.testing.assert_array_equal(_read_idx(tmp_path / "x.gz", ndim=3, max_items=2), images_nhw[:2])


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "magic.gz"
    with gzip.open(bad_magic, "wb") as stream:
        stream.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match=r"magic\.gz: not an IDX file"):
        _read_idx(bad_magic, ndim=1)
    _write_idx(tmp_path / "rank.gz", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="rank is 2, expected 3"):
        _read_idx(tmp_path / "rank.gz", ndim=3)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as stream:
        stream.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match=r"short\.gz: truncated"):
        _read_idx(truncated, ndim=1)


@needs_fmnist
def test_read_idx_on_fashion_mnist() -> None:
    labels_n = _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", ndim=1)
    images_nhw = _read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", ndim=3, max_items=100)
    assert labels_n.shape == (10_000,) and images_nhw.shape == (100, 28, 28)
    # Fashion-MNIST's test set is balanced: 1,000 items per class.
    assert np.bincount(labels_n).tolist() == [1000] * 10


# --- polygons ---------------------------------------------------------------------------


def test_mask_to_polygons_is_exact_on_random_masks() -> None:
    """Even speckle masks with holes and islands rasterize back to themselves."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(4, 30, size=2))
        mask_hw = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        if trial % 2:
            mask_hw = ndimage.binary_closing(mask_hw) | ndimage.binary_opening(mask_hw)
        polygons = mask_to_polygons(mask_hw)
        decoded_hw = (
            segmentation_to_mask(polygons, height, width).astype(bool)
            if polygons
            else np.zeros_like(mask_hw)
        )
        np.testing.assert_array_equal(decoded_hw, mask_hw)


def test_mask_to_polygons_keeps_a_ring_hole() -> None:
    mask_hw = np.zeros((9, 9), dtype=bool)
    mask_hw[1:8, 1:8] = True
    mask_hw[3:6, 3:6] = False
    polygons = mask_to_polygons(mask_hw)
    assert len(polygons) == 1  # one component: outer contour with the hole spliced in
    decoded_hw = segmentation_to_mask(polygons, 9, 9).astype(bool)
    np.testing.assert_array_equal(decoded_hw, mask_hw)


# --- composition ------------------------------------------------------------------------


@needs_fmnist
def test_composed_scene_pastes_exactly_the_masks() -> None:
    composer = SceneComposer.from_sources("val", img_size=96, objects_per_image=(2, 3))
    for index in range(8):
        scene = composer.compose(scene_rng(5, "val", index))
        n = len(scene.masks_nhw)
        assert 1 <= n <= 3 and scene.classes_n.shape == (n,)
        union_hw = scene.masks_nhw.any(axis=0)
        # Masks are disjoint and at least two pixels apart.
        assert scene.masks_nhw.sum(axis=0).max() <= 1
        for i in range(n):
            grown_hw = ndimage.binary_dilation(scene.masks_nhw[i], iterations=2)
            others_hw = np.delete(scene.masks_nhw, i, axis=0).any(axis=0)
            assert not (grown_hw & others_hw).any()
        # Only mask pixels were changed; almost all of them visibly.
        changed_hw = (scene.image_hwc != scene.background_hwc).any(axis=-1)
        assert not (changed_hw & ~union_hw).any()
        assert changed_hw[union_hw].mean() > 0.9
        # The ADE rendering of the same scene.
        label_hw = semantic_label(scene)
        for mask_hw, cls in zip(scene.masks_nhw, scene.classes_n, strict=True):
            assert (label_hw[mask_hw] == cls + 2).all()
        band_hw = ndimage.binary_dilation(union_hw) & ~union_hw
        assert (label_hw[band_hw] == 0).all()
        assert (label_hw[~band_hw & ~union_hw] == 1).all()


# --- the written set --------------------------------------------------------------------


@needs_fmnist
def test_counts_and_manifest(scene_set: tuple[Path, dict]) -> None:
    out_dir, manifest = scene_set
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    files = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert files - {"manifest.json"} == set(manifest["files"])
    for split, ade_split, n_images in (
        ("train", "training", SMALL["n_train"]),
        ("val", "validation", SMALL["n_val"]),
    ):
        assert len(list((out_dir / "coco" / f"{split}2017").glob("*.png"))) == n_images
        assert len(list((out_dir / "ade" / "images" / ade_split).glob("*.jpg"))) == n_images
        assert len(list((out_dir / "ade" / "annotations" / ade_split).glob("*.png"))) == n_images
        coco = json.loads(
            (out_dir / "coco" / "annotations" / f"instances_{split}2017.json").read_text()
        )
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == list(FASHION_MNIST_CLASSES)
        per_image = np.bincount(
            [a["image_id"] for a in coco["annotations"]], minlength=n_images + 1
        )
        assert per_image[0] == 0 and per_image[1:].min() >= 1 and per_image.max() <= 3
        assert all(a["iscrowd"] == 0 for a in coco["annotations"])
        summary = manifest["splits"][split]
        assert summary["images"] == n_images == len(coco["images"])
        assert summary["instances"] == len(coco["annotations"])
        assert sum(summary["instances_per_class"].values()) == summary["instances"]
    assert manifest["ade"]["num_classes"] == ADE_NUM_CLASSES == 11
    assert not list(out_dir.parent.glob(".set.*"))  # no temp folders left behind


@needs_fmnist
def test_ade_labels_agree_with_coco_masks(scene_set: tuple[Path, dict]) -> None:
    out_dir, _ = scene_set
    coco = CocoInstances(
        out_dir / "coco" / "annotations" / "instances_val2017.json", out_dir / "coco" / "val2017"
    )
    ade = ADE20KSegmentation(out_dir / "ade", "validation", num_classes=ADE_NUM_CLASSES)
    assert len(ade) == len(coco) == SMALL["n_val"]
    for index in range(len(coco)):
        coco_img_chw, target = coco[index]
        ade_img_chw, label_hw = ade[index]
        # Same scene: the JPEG copy stays close to the lossless PNG.
        assert (ade_img_chw - coco_img_chw).abs().mean() < 0.03
        expected_hw = np.zeros(label_hw.shape, dtype=np.int64)  # background -> class 0
        for mask_hw, label in zip(target["masks"].bool(), target["labels"], strict=True):
            expected_hw[mask_hw.numpy()] = int(label)  # COCO label k -> ADE class k
        ignored_hw = label_hw.numpy() == 255
        assert 0 < ignored_hw.mean() < 0.2
        np.testing.assert_array_equal(label_hw.numpy()[~ignored_hw], expected_hw[~ignored_hw])
    # A num_classes below the largest stored value is caught when the label is read.
    raw_max = int(np.asarray(Image.open(ade.samples[0][1])).max())
    too_few = ADE20KSegmentation(out_dir / "ade", "validation", num_classes=raw_max - 1)
    with pytest.raises(ValueError, match=f"exceed num_classes={raw_max - 1}"):
        too_few[0]


@needs_fmnist
def test_same_seed_same_bytes_and_prefix_stability(
    scene_set: tuple[Path, dict], tmp_path: Path
) -> None:
    out_dir, manifest = scene_set
    again = make_scenes(tmp_path / "again", **SMALL)
    assert again == manifest
    assert _tree(tmp_path / "again") == _tree(out_dir)
    other = make_scenes(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert (
        other["files"]["coco/train2017/000001.png"]
        != manifest["files"]["coco/train2017/000001.png"]
    )
    # Scene i depends on (seed, split, i) only: a shorter set is a prefix of a longer one.
    shorter = make_scenes(tmp_path / "short", **{**SMALL, "n_train": 2})
    for name in (
        "coco/train2017/000001.png",
        "coco/train2017/000002.png",
        "ade/images/training/000002.jpg",
    ):
        assert shorter["files"][name] == manifest["files"][name]


@needs_fmnist
def test_atomic_write_and_overwrite(tmp_path: Path) -> None:
    out_dir = tmp_path / "set"
    small = {**SMALL, "n_train": 1, "n_val": 1}
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file missing"):
        make_scenes(out_dir, **small, fmnist_dir=tmp_path / "nowhere")
    assert list(tmp_path.iterdir()) == []  # a failed run leaves nothing behind
    make_scenes(out_dir, **small)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_scenes(out_dir, **small)
    manifest = make_scenes(out_dir, **{**small, "n_train": 2}, overwrite=True)
    assert manifest["splits"]["train"]["images"] == 2
    assert len(list((out_dir / "coco" / "train2017").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask_format"):
        make_scenes(tmp_path / "x", 1, 1, mask_format="bitmap")
    with pytest.raises(ValueError, match="n_train"):
        make_scenes(tmp_path / "x", 0, 1)
    with pytest.raises(ValueError, match="objects_per_image"):
        SceneComposer(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), [], 64, (3, 1))
    with pytest.raises(ValueError, match="img_size"):
        SceneComposer(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), [], 48, (1, 2))
    assert not (tmp_path / "x").exists()
    # A gray photo stays usable as a background; the output is RGB.
    photo_hw3 = np.asarray(Image.new("RGB", (50, 40), (10, 20, 30)))
    items_nhw = np.full((1, 28, 28), 200, dtype=np.uint8)
    composer = SceneComposer(items_nhw, np.array([4]), [photo_hw3], img_size=64, scale=(1.5, 1.5))
    scene = composer.compose(np.random.default_rng(0))
    assert scene.image_hwc.shape == (64, 64, 3) and scene.classes_n.tolist() == [4]
    assert scene.masks_nhw.sum() == 42 * 42  # a full square item at 1.5x: 42 x 42 pixels
