"""Tests for a2mim.data.imagefolder.ImageFolderDataset on small hand-made folder trees."""

from __future__ import annotations

import io
import logging
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2mim.data.imagefolder import CorruptImageError, ImageFolderDataset
from a2mim.data.transforms import eval_transform


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def gray(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def undecodable_png() -> bytes:
    """A PNG whose chunks and CRCs are valid (so ``verify()`` passes) but whose IDAT payload
    is not a zlib stream, so decoding the pixels fails."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)  # 8x8, 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"this is not a zlib stream")
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, object]:
    """root/train/{cat,dog}: 5 good images (gray, RGB, nested), one truncated PNG, one text
    file named .png, plus files that are not images and must be ignored."""
    root = tmp_path / "root"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (cat / "nested").mkdir(parents=True)
    dog.mkdir(parents=True)
    good = {
        cat / "b.png": gray(1),
        cat / "a.png": gray(2),
        cat / "nested" / "c.png": gray(3),
        dog / "z.png": gray(4),
        dog / "rgb.PNG": np.stack([gray(5), gray(6), gray(7)], axis=-1),
    }
    for path, arr in good.items():
        path.write_bytes(png_bytes(arr))
    truncated = dog / "truncated.png"
    full = png_bytes(gray(8, size=28))
    truncated.write_bytes(full[: len(full) // 2])
    not_image = cat / "notes.png"
    not_image.write_text("these are notes, not pixels\n")
    (cat / "readme.txt").write_text("ignored: not an image extension")
    (dog / ".hidden.png").write_text("ignored: hidden")
    (root / "train" / "stray.png").write_bytes(png_bytes(gray(9)))  # not inside a class
    return {"root": root, "good": good, "bad": sorted([str(truncated), str(not_image)])}


def test_corrupt_error_names_files(tree: dict) -> None:
    with pytest.raises(CorruptImageError) as err:
        ImageFolderDataset(tree["root"], "train")
    message = str(err.value)
    for path in tree["bad"]:
        assert path in message
    assert "2 of 7 image(s)" in message
    assert 'on_corrupt="skip"' in message and "--skip-corrupt" in message
    assert sorted(err.value.paths) == tree["bad"]


def test_skip_drops_and_reports(tree: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="a2mim.data.imagefolder"):
        ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    assert sorted(ds.skipped) == tree["bad"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 corrupt or unreadable image(s) of 7" in warnings[0].getMessage()
    assert all(path in warnings[0].getMessage() for path in tree["bad"])

    root = tree["root"] / "train"
    assert ds.classes == ["cat", "dog"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.samples == [
        (str(root / "cat" / "a.png"), 0),
        (str(root / "cat" / "b.png"), 0),
        (str(root / "cat" / "nested" / "c.png"), 0),
        (str(root / "dog" / "rgb.PNG"), 1),
        (str(root / "dog" / "z.png"), 1),
    ]
    assert ds.targets == [0, 0, 0, 1, 1]
    assert len(ds) == 5


def test_clean_tree_has_no_warning(tree: dict, caplog: pytest.LogCaptureFixture) -> None:
    for path in tree["bad"]:
        Path(path).unlink()
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    assert ds.skipped == [] and len(ds) == 5
    assert not [r for r in caplog.records if r.name == "a2mim.data.imagefolder"]


def test_getitem_returns_rgb_pil(tree: dict) -> None:
    ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    for index, (path, target) in enumerate(ds.samples):
        img, got_target = ds[index]
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert got_target == target
        expected = tree["good"][Path(path)]
        pixels = np.asarray(img)
        if expected.ndim == 2:  # grayscale replicated to three channels
            expected = np.repeat(expected[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(pixels, expected)


def test_getitem_applies_transform(tree: dict) -> None:
    ds = ImageFolderDataset(
        tree["root"], "train", transform=eval_transform(16, 1.0), on_corrupt="skip"
    )
    img_chw, target = ds[0]
    assert isinstance(img_chw, torch.Tensor)
    assert img_chw.shape == (3, 16, 16) and img_chw.dtype == torch.float32
    assert target == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    img_bchw, target_b = next(iter(loader))
    assert img_bchw.shape == (5, 3, 16, 16)
    assert target_b.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_decode_failure_in_getitem(tmp_path: Path, on_corrupt: str) -> None:
    cls = tmp_path / "root" / "val" / "only"
    cls.mkdir(parents=True)
    (cls / "0.png").write_bytes(png_bytes(gray(0)))
    broken = cls / "1.png"
    broken.write_bytes(undecodable_png())
    ds = ImageFolderDataset(tmp_path / "root", "val", on_corrupt=on_corrupt)
    assert len(ds) == 2 and ds.skipped == []  # passes the cheap verify pass
    ds[0]
    with pytest.raises(CorruptImageError, match="fails to decode") as err:
        ds[1]
    assert str(broken) in str(err.value)
    assert err.value.paths == [str(broken)]


def test_many_corrupt_files_are_summarised(tmp_path: Path) -> None:
    cls = tmp_path / "root" / "train" / "a"
    cls.mkdir(parents=True)
    (cls / "good.png").write_bytes(png_bytes(gray(0)))
    for i in range(8):
        (cls / f"bad{i}.png").write_bytes(b"junk")
    with pytest.raises(CorruptImageError, match="and 3 more") as err:
        ImageFolderDataset(tmp_path / "root", "train")
    assert len(err.value.paths) == 8


def test_skip_that_empties_a_class_raises(tmp_path: Path) -> None:
    (tmp_path / "r" / "train" / "a").mkdir(parents=True)
    (tmp_path / "r" / "train" / "b").mkdir(parents=True)
    (tmp_path / "r" / "train" / "a" / "x.png").write_bytes(png_bytes(gray(0)))
    (tmp_path / "r" / "train" / "b" / "y.png").write_bytes(b"junk")
    with pytest.raises(CorruptImageError, match=r"class\(es\) b .* no images left"):
        ImageFolderDataset(tmp_path / "r", "train", on_corrupt="skip")


def test_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"<root>/<split>/<class>/\*\.png") as err:
        ImageFolderDataset(tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in str(err.value)
    (tmp_path / "root").mkdir()
    with pytest.raises(FileNotFoundError, match="split folder") as err:
        ImageFolderDataset(tmp_path / "root", "val")
    assert str(tmp_path / "root" / "val") in str(err.value)


def test_no_classes(tmp_path: Path) -> None:
    split = tmp_path / "root" / "train"
    split.mkdir(parents=True)
    (split / "loose.png").write_bytes(png_bytes(gray(0)))
    (split / ".cache").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders") as err:
        ImageFolderDataset(tmp_path / "root", "train")
    assert str(split) in str(err.value) and "<root>/<split>/<class>/*.png" in str(err.value)


def test_class_without_images(tmp_path: Path) -> None:
    split = tmp_path / "root" / "train"
    (split / "a").mkdir(parents=True)
    (split / "empty").mkdir()
    (split / "a" / "x.png").write_bytes(png_bytes(gray(0)))
    (split / "empty" / "x.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) empty under") as err:
        ImageFolderDataset(tmp_path / "root", "train")
    assert str(split) in str(err.value)


def test_extensions_filter(tmp_path: Path) -> None:
    cls = tmp_path / "root" / "train" / "a"
    cls.mkdir(parents=True)
    Image.fromarray(gray(0)).save(cls / "x.png")
    Image.fromarray(gray(1)).save(cls / "y.bmp")
    assert len(ImageFolderDataset(tmp_path / "root", "train")) == 2
    only_png = ImageFolderDataset(tmp_path / "root", "train", extensions=("png",))
    assert [Path(p).name for p, _ in only_png.samples] == ["x.png"]


def test_bad_on_corrupt_value(tree: dict) -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        ImageFolderDataset(tree["root"], "train", on_corrupt="ignore")  # type: ignore[arg-type]


def test_corrupt_error_pickles_with_paths() -> None:
    """DataLoader workers send exceptions across processes; the file list must survive."""
    err = CorruptImageError("bad file /x.png", paths=["/x.png"])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CorruptImageError
    assert str(back) == "bad file /x.png" and back.paths == ["/x.png"]
    assert CorruptImageError("message only").paths == []
