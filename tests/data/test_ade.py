"""ADE20K-layout loader: label mapping on hand-made PNGs and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2mim.config import ConfigError
from a2mim.data.ade import ADE20KSegmentation, AdeLayoutError, reduce_zero_label, validate_root


def _write_pair(
    root: Path,
    stem: str,
    label: np.ndarray | Image.Image,
    split: str = "training",
    image_size: tuple[int, int] | None = None,
) -> tuple[Path, Path]:
    """Write ``root/images/<split>/<stem>.jpg`` and its label PNG; sizes are (W, H)."""
    image_dir = root / "images" / split
    label_dir = root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(label, np.ndarray):
        label = Image.fromarray(label.astype(np.uint8), mode="L")
    size = image_size or label.size
    rgb_hwc = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
    image_path = image_dir / f"{stem}.jpg"
    label_path = label_dir / f"{stem}.png"
    Image.fromarray(rgb_hwc).save(image_path, quality=95)
    label.save(label_path)
    return image_path, label_path


RAW_HW = np.array([[0, 1, 2], [150, 5, 0]])


def test_reduce_zero_label_mapping(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a", RAW_HW)
    dataset = ADE20KSegmentation(tmp_path, "training")
    img_chw, label_hw = dataset[0]
    assert img_chw.shape == (3, 2, 3) and img_chw.dtype == torch.float32
    assert img_chw.min() >= 0.0 and img_chw.max() <= 1.0
    assert label_hw.dtype == torch.int64
    assert label_hw.tolist() == [[255, 0, 1], [149, 4, 255]]
    np.testing.assert_array_equal(reduce_zero_label(RAW_HW), [[255, 0, 1], [149, 4, 255]])


def test_without_reduction_values_pass_through(tmp_path: Path) -> None:
    raw_hw = np.array([[0, 1, 255], [9, 3, 0]])
    _write_pair(tmp_path, "a", raw_hw, split="validation")
    dataset = ADE20KSegmentation(tmp_path, "validation", reduce_zero_label=False, num_classes=10)
    assert dataset[0][1].tolist() == raw_hw.tolist()


def test_palette_label_uses_indices(tmp_path: Path) -> None:
    label = Image.fromarray(np.array([[3, 0], [11, 1]], dtype=np.uint8), mode="P")
    label.putpalette([255 - i % 256 for i in range(768)])  # colors differ from indices
    _write_pair(tmp_path, "p", label)
    dataset = ADE20KSegmentation(tmp_path, num_classes=11)
    assert dataset[0][1].tolist() == [[2, 255], [10, 0]]


def test_pairs_sorted_and_transforms(tmp_path: Path) -> None:
    for stem in ("b", "a", "c"):
        _write_pair(tmp_path, stem, RAW_HW)
    calls = []

    def transform(img_chw: torch.Tensor, label_hw: torch.Tensor):
        calls.append(img_chw.shape)
        return img_chw.flip(-1), label_hw.flip(-1)

    dataset = ADE20KSegmentation(tmp_path, transforms=transform)
    assert [p.stem for p, _ in dataset.samples] == ["a", "b", "c"]
    assert dataset[1][1].tolist() == [[1, 0, 255], [255, 4, 149]]
    assert calls == [(3, 2, 3)]


@pytest.mark.parametrize(
    ("num_classes", "reduce", "raw_max"),
    [(150, True, 151), (10, True, 11), (10, False, 10)],
)
def test_out_of_range_label_names_file(
    tmp_path: Path, num_classes: int, reduce: bool, raw_max: int
) -> None:
    _, label_path = _write_pair(tmp_path, "bad", np.array([[0, raw_max], [1, 2]]))
    dataset = ADE20KSegmentation(tmp_path, reduce_zero_label=reduce, num_classes=num_classes)
    with pytest.raises(ValueError) as info:
        dataset[0]
    message = str(info.value)
    assert str(label_path) in message
    assert f"[{raw_max}]" in message and f"num_classes={num_classes}" in message


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    image_path, label_path = _write_pair(tmp_path, "m", RAW_HW, image_size=(4, 2))
    with pytest.raises(ValueError) as info:
        ADE20KSegmentation(tmp_path)
    message = str(info.value)
    assert "size mismatch" in message
    assert str(image_path) in message and str(label_path) in message


def test_missing_annotation_names_image(tmp_path: Path) -> None:
    _write_pair(tmp_path, "ok", RAW_HW)
    image_path, label_path = _write_pair(tmp_path, "lonely", RAW_HW)
    label_path.unlink()
    with pytest.raises(FileNotFoundError) as info:
        ADE20KSegmentation(tmp_path)
    assert str(image_path) in str(info.value) and str(label_path) in str(info.value)


def test_color_label_is_rejected(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8), mode="RGB")
    _, label_path = _write_pair(tmp_path, "rgb", rgb)
    with pytest.raises(ValueError) as info:
        ADE20KSegmentation(tmp_path)
    assert str(label_path) in str(info.value) and "'RGB'" in str(info.value)


def test_bad_arguments_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        ADE20KSegmentation(tmp_path, split="train")
    with pytest.raises(ValueError, match="num_classes"):
        ADE20KSegmentation(tmp_path, num_classes=255)
    with pytest.raises(FileNotFoundError, match="images"):
        ADE20KSegmentation(tmp_path)


def _both_splits(root: Path, label_hw: np.ndarray, n: int = 3) -> None:
    for split in ("training", "validation"):
        for i in range(n):
            _write_pair(root, f"{split[0]}{i}", label_hw, split=split)


def test_validate_root_accepts_the_ade_layout_and_reports_the_scan(tmp_path: Path) -> None:
    _both_splits(tmp_path, RAW_HW)
    scan = validate_root(tmp_path, num_classes=150)
    assert scan["label_files_scanned"] == 6 and scan["values_seen"] == [0, 150]
    assert issubclass(AdeLayoutError, ConfigError)


def test_validate_root_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(AdeLayoutError, match=r"not a folder; expected images/training"):
        validate_root(tmp_path / "nowhere", num_classes=150)
    _write_pair(tmp_path, "a", RAW_HW)  # training only
    with pytest.raises(AdeLayoutError, match=r"missing folder .*images/validation.*ADEChallenge"):
        validate_root(tmp_path, num_classes=150)
    _write_pair(tmp_path, "b", RAW_HW, split="validation")
    (tmp_path / "annotations" / "validation" / "b.png").unlink()
    with pytest.raises(AdeLayoutError, match=r"b\.jpg has no label .*b\.png"):
        validate_root(tmp_path, num_classes=150)


def test_validate_root_tells_the_label_conventions_apart(tmp_path: Path) -> None:
    """0..K-1 + void 255 read with the ADE convention, and ADE labels read as 0..K-1: each is
    refused with the setting that fixes it; the right setting passes."""
    void = tmp_path / "void"
    _both_splits(void, np.array([[0, 1, 255], [9, 3, 255]]))
    with pytest.raises(AdeLayoutError, match=r"set data\.reduce_zero_label: false"):
        validate_root(void, num_classes=10)
    assert validate_root(void, num_classes=10, reduce_zero_label=False)["ignore_seen"]
    ade = tmp_path / "ade"
    _both_splits(ade, np.array([[0, 1, 10], [9, 3, 0]]))
    with pytest.raises(AdeLayoutError, match=r"set data\.reduce_zero_label: true"):
        validate_root(ade, num_classes=10, reduce_zero_label=False)
    assert validate_root(ade, num_classes=10)["values_seen"] == [0, 10]
    with pytest.raises(AdeLayoutError, match=r"values \[10\] .*set data\.num_classes"):
        validate_root(ade, num_classes=9)


SIXTEEN_HW = np.array([[0, 257, 1000, 32768], [40000, 65279, 65535, 128]], dtype=np.uint16)
SIXTEEN_AS_8BIT = np.array([[0, 1, 4, 128], [156, 254, 255, 0]])  # round(v / 257)


def _write_sixteen_bit_pair(root: Path, stem: str, label_hw: np.ndarray, split: str) -> Path:
    """A 16-bit grayscale image (real I;16 PNG) and a 16-bit label PNG holding ``label_hw``."""
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(SIXTEEN_HW).save(root / "images" / split / f"{stem}.png")
    label_path = root / "annotations" / split / f"{stem}.png"
    Image.fromarray(label_hw.astype(np.uint16)).save(label_path)
    with Image.open(label_path) as raw:  # really 16 bits on disk, read back as such
        assert raw.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(raw), label_hw)
    return label_path


def test_sixteen_bit_image_is_scaled_and_sixteen_bit_label_keeps_its_values(
    tmp_path: Path,
) -> None:
    label_hw = np.array([[0, 1, 2, 150], [149, 5, 0, 3]])
    for split in ("training", "validation"):
        _write_sixteen_bit_pair(tmp_path, "deep", label_hw, split)
    img_chw, out_hw = ADE20KSegmentation(tmp_path, "training")[0]
    expected = torch.from_numpy(SIXTEEN_AS_8BIT).float() / 255.0
    for channel in img_chw:  # gray to RGB, never clipped to 0/255
        torch.testing.assert_close(channel, expected)
    assert out_hw.tolist() == reduce_zero_label(label_hw).tolist()  # class ids, not v / 257
    scan = validate_root(tmp_path, num_classes=150)
    assert scan["values_seen"] == [0, 150]


def test_sixteen_bit_label_is_checked_against_num_classes(tmp_path: Path) -> None:
    label_hw = np.array([[0, 1, 300, 2], [2, 1, 0, 1000]])  # values an 8-bit file cannot hold
    for split in ("training", "validation"):
        label_path = _write_sixteen_bit_pair(tmp_path, "deep", label_hw, split)
    dataset = ADE20KSegmentation(tmp_path, "validation")
    with pytest.raises(ValueError, match=r"\[300, 1000\] exceed num_classes=150") as info:
        dataset[0]
    assert str(label_path) in str(info.value)
    with pytest.raises(AdeLayoutError, match=r"values \[300, 1000\] .*set data\.num_classes"):
        validate_root(tmp_path, num_classes=150)
