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


SKIP_SETTING = "data.skip_corrupt: true"


def test_indexing_opens_no_image(tree: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the dataset lists folders only: no PIL open, no open() of any image file."""
    opened: list[str] = []

    def no_pil_open(path, *args, **kwargs):
        opened.append(str(path))
        raise AssertionError(f"PIL.Image.open({path}) while indexing")

    real_open = open

    def counting_open(path, *args, **kwargs):
        if str(path).lower().endswith((".png", ".jpg", ".jpeg")):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", no_pil_open)
    monkeypatch.setattr("builtins.open", counting_open)
    ds = ImageFolderDataset(tree["root"], "train")
    assert opened == []
    assert len(ds) == 7 and ds.skipped == []  # corrupt files are found when read, not now
    monkeypatch.undo()
    assert isinstance(ds[0][0], Image.Image)  # reading does open the file


def test_corrupt_file_is_named_when_read(tree: dict) -> None:
    ds = ImageFolderDataset(tree["root"], "train")
    index = {path: i for i, (path, _) in enumerate(ds.samples)}
    for path in tree["bad"]:
        with pytest.raises(CorruptImageError) as err:
            ds[index[path]]
        message = str(err.value)
        assert path in message and err.value.paths == [path]
        assert SKIP_SETTING in message and "--set data.skip_corrupt=true" in message
        assert "--skip-corrupt" not in message  # no such option


def test_verify_names_every_corrupt_file(tree: dict) -> None:
    ds = ImageFolderDataset(tree["root"], "train")
    with pytest.raises(CorruptImageError) as err:
        ds.verify()
    message = str(err.value)
    for path in tree["bad"]:
        assert path in message
    assert "2 of 7 image(s)" in message
    assert SKIP_SETTING in message and "--skip-corrupt" not in message
    assert sorted(err.value.paths) == tree["bad"]


def test_skip_on_read_uses_next_sample_and_warns(
    tree: dict, caplog: pytest.LogCaptureFixture
) -> None:
    ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    paths = [path for path, _ in ds.samples]
    bad = paths.index(str(tree["root"] / "train" / "cat" / "notes.png"))
    with caplog.at_level(logging.WARNING, logger="a2mim.data.imagefolder"):
        img, target = ds[bad]
        ds[bad]  # the same file is named once per process
    following = Image.open(paths[bad + 1]).convert("RGB")
    np.testing.assert_array_equal(np.asarray(img), np.asarray(following))
    assert target == ds.samples[bad + 1][1]
    assert ds.skipped == [paths[bad]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and paths[bad] in warnings[0]
    last = paths.index(str(tree["root"] / "train" / "dog" / "z.png"))
    assert ds[last][1] == 1  # wrap-around still returns a readable sample


def test_skip_drops_and_reports(tree: dict, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="a2mim.data.imagefolder"):
        assert sorted(ds.verify()) == tree["bad"]
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


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    cls = tmp_path / "root" / "train" / "a"
    cls.mkdir(parents=True)
    values = np.array([[0, 257, 1000, 32768], [40000, 65279, 65535, 128]], dtype=np.uint16)
    path = cls / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:  # a real 16-bit PNG, read back as such
        assert raw.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(raw), values)
    img, _ = ImageFolderDataset(tmp_path / "root", "train")[0]
    assert img.mode == "RGB"
    expected = np.array([[0, 1, 4, 128], [156, 254, 255, 0]], dtype=np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(expected[:, :, None], 3, axis=2))


def test_clean_tree_has_no_warning(tree: dict, caplog: pytest.LogCaptureFixture) -> None:
    for path in tree["bad"]:
        Path(path).unlink()
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
        assert ds.verify() == []
        [ds[i] for i in range(len(ds))]
    assert ds.skipped == [] and len(ds) == 5
    assert not [r for r in caplog.records if r.name == "a2mim.data.imagefolder"]


def test_getitem_returns_rgb_pil(tree: dict) -> None:
    ds = ImageFolderDataset(tree["root"], "train", on_corrupt="skip")
    ds.verify()
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
    ds.verify()
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
    assert ds.verify() == [] and len(ds) == 2  # passes the cheap verify pass
    ds[0]
    with pytest.raises(CorruptImageError, match="corrupt or unreadable") as err:
        ds.load_image(1)
    assert str(broken) in str(err.value)
    assert err.value.paths == [str(broken)]
    if on_corrupt == "error":
        with pytest.raises(CorruptImageError, match=str(broken)):
            ds[1]
    else:
        assert ds[1][0].tobytes() == ds[0][0].tobytes()  # wrapped round to sample 0
        assert ds.skipped == [str(broken)]


def test_all_corrupt_with_skip_raises(tmp_path: Path) -> None:
    cls = tmp_path / "root" / "train" / "a"
    cls.mkdir(parents=True)
    for i in range(2):
        (cls / f"bad{i}.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path / "root", "train", on_corrupt="skip")
    with pytest.raises(CorruptImageError, match="every one of the 2 image"):
        ds[0]


def test_many_corrupt_files_are_summarised(tmp_path: Path) -> None:
    cls = tmp_path / "root" / "train" / "a"
    cls.mkdir(parents=True)
    (cls / "good.png").write_bytes(png_bytes(gray(0)))
    for i in range(8):
        (cls / f"bad{i}.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path / "root", "train")
    with pytest.raises(CorruptImageError, match="and 3 more") as err:
        ds.verify()
    assert len(err.value.paths) == 8


def test_skip_that_empties_a_class_raises(tmp_path: Path) -> None:
    (tmp_path / "r" / "train" / "a").mkdir(parents=True)
    (tmp_path / "r" / "train" / "b").mkdir(parents=True)
    (tmp_path / "r" / "train" / "a" / "x.png").write_bytes(png_bytes(gray(0)))
    (tmp_path / "r" / "train" / "b" / "y.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path / "r", "train", on_corrupt="skip")
    with pytest.raises(CorruptImageError, match=r"class\(es\) b .* no images left"):
        ds.verify()


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
