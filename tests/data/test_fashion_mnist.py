"""Tests for a2mim.data.fashion_mnist: IDX reading, preparation, source lookup, download."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from a2mim.data import fashion_mnist as fm
from a2mim.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    MANIFEST_NAME,
    FashionMNISTSourceError,
    PreparedDirError,
    prepare_fashion_mnist,
    read_idx,
)

needs_debian = pytest.mark.skipif(
    not (fm.DEBIAN_SOURCE_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="real data absent: apt-get install dataset-fashion-mnist",
)
FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# ------------------------------------------------------------------------------------------
# helpers: an independent IDX writer and a tiny synthetic Fashion-MNIST
# ------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as IDX by hand (struct), independent of the reader under test."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim)
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def synthetic_files(train_per_class: int = 3, val_per_class: int = 2) -> dict[str, bytes]:
    """Official file name -> gzip bytes of a tiny, shuffled, labelled image set."""
    rng = np.random.default_rng(123)
    files = {}
    for prefix, per_class in (("train", train_per_class), ("t10k", val_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        files[f"{prefix}-images-idx3-ubyte.gz"] = gz(idx_bytes(images))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gz(idx_bytes(labels))
    return files


@pytest.fixture
def synthetic_source(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    for name, data in synthetic_files().items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def no_local_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pretend neither the env var nor the Debian package provide the data."""
    monkeypatch.delenv(fm.SOURCE_ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_SOURCE_DIR", tmp_path / "no-debian-package")


def png_files(split_dir: Path) -> list[Path]:
    return sorted(split_dir.glob("*/*.png"))


# ------------------------------------------------------------------------------------------
# read_idx
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[-300, 2], [7, 32000]], dtype=np.int16),
        np.array([1.5, -2.25, 1e10], dtype=np.float32),
    ],
    ids=["uint8-3d", "int16-2d", "float32-1d"],
)
def test_read_idx_round_trip(tmp_path: Path, arr: np.ndarray, compress: bool) -> None:
    raw = idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gz(raw) if compress else raw)
    out = read_idx(path)
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # the result is a writable copy


def test_read_idx_truncated_names_file(tmp_path: Path) -> None:
    raw = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / "short-images-idx3-ubyte"
    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    assert "3152 bytes" in str(err.value)  # 16-byte header + 4 * 28 * 28 pixels


def test_read_idx_header_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "header.idx"
    path.write_bytes(idx_bytes(np.zeros((4, 5), dtype=np.uint8))[:9])
    with pytest.raises(ValueError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_extra_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="longer than its header"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    data = gz(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    raw = bytearray(idx_bytes(np.zeros(3, dtype=np.uint8)))
    raw[0] = 0x01
    path = tmp_path / "magic.idx"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_unknown_type_code(tmp_path: Path) -> None:
    raw = bytearray(idx_bytes(np.zeros(3, dtype=np.uint8)))
    raw[2] = 0x07
    path = tmp_path / "code.idx"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="type code 0x07"):
        read_idx(path)


def test_read_idx_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.idx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


@needs_debian
def test_read_idx_real_labels_golden() -> None:
    """First labels and class balance of the official files (well-known values)."""
    train = read_idx(fm.DEBIAN_SOURCE_DIR / "train-labels-idx1-ubyte.gz")
    val = read_idx(fm.DEBIAN_SOURCE_DIR / "t10k-labels-idx1-ubyte.gz")
    assert train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert val[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(train).tolist() == [6000] * 10
    assert np.bincount(val).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------
# prepare on the real data (small subset)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not (fm.DEBIAN_SOURCE_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real data absent: apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("prepared") / "fmnist"
    manifest = prepare_fashion_mnist(
        out, source_dir=fm.DEBIAN_SOURCE_DIR, train_per_class=5, val_per_class=3, seed=7
    )
    return out, manifest


def test_prepare_real_counts_and_manifest(real_subset: tuple[Path, dict]) -> None:
    out, manifest = real_subset
    for split, per_class in (("train", 5), ("val", 3)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(FASHION_MNIST_CLASSES)
        for name in FASHION_MNIST_CLASSES:
            assert len(list((out / split / name).glob("*.png"))) == per_class
        assert manifest["counts"][split] == dict.fromkeys(FASHION_MNIST_CLASSES, per_class)
    assert manifest["totals"] == {"train": 50, "val": 30}
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert manifest["train_per_class"] == 5 and manifest["val_per_class"] == 3
    assert manifest["seed"] == 7
    assert manifest["source"]["kind"] == "explicit"
    leftovers = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert leftovers == []  # the temp build folder was renamed, nothing else left


def test_prepare_real_pngs_equal_idx_pixels(real_subset: tuple[Path, dict]) -> None:
    out, _ = real_subset
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(fm.DEBIAN_SOURCE_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(fm.DEBIAN_SOURCE_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        files = png_files(out / split)
        assert files
        for path in files:
            index = int(path.stem)
            assert FASHION_MNIST_CLASSES[labels[index]] == path.parent.name
            with Image.open(path) as img:
                assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(img), images[index])


def test_prepare_real_is_idempotent(real_subset: tuple[Path, dict]) -> None:
    out, manifest = real_subset
    watched = [out / MANIFEST_NAME, *png_files(out / "train")[:3]]
    before = [p.stat().st_mtime_ns for p in watched]
    again = prepare_fashion_mnist(
        out, source_dir="/nonexistent/not/read", train_per_class=5, val_per_class=3, seed=7
    )
    assert again == manifest
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_prepare_real_mismatch_raises(real_subset: tuple[Path, dict]) -> None:
    out, _ = real_subset
    with pytest.raises(PreparedDirError, match="train_per_class: 5 there, 6 asked") as err:
        prepare_fashion_mnist(out, train_per_class=6, val_per_class=3, seed=7)
    assert str(out) in str(err.value) and "--out" in str(err.value)
    with pytest.raises(PreparedDirError, match="seed"):
        prepare_fashion_mnist(out, train_per_class=5, val_per_class=3, seed=8)


@needs_debian
def test_prepare_real_subset_is_seeded(tmp_path: Path) -> None:
    def names(out: Path, seed: int) -> list[str]:
        prepare_fashion_mnist(out, train_per_class=2, val_per_class=1, seed=seed)
        return [str(p.relative_to(out)) for p in png_files(out / "train") + png_files(out / "val")]

    first = names(tmp_path / "a", seed=1)
    assert names(tmp_path / "b", seed=1) == first
    assert names(tmp_path / "c", seed=2) != first


# ------------------------------------------------------------------------------------------
# prepare: errors, atomicity, source lookup (synthetic data, fast)
# ------------------------------------------------------------------------------------------


def test_prepare_full_synthetic(synthetic_source: Path, tmp_path: Path) -> None:
    manifest = prepare_fashion_mnist(tmp_path / "out", source_dir=synthetic_source)
    assert manifest["totals"] == {"train": 30, "val": 20}
    assert manifest["train_per_class"] is None
    # without a subset the seed plays no part, so another seed is not a mismatch
    assert prepare_fashion_mnist(tmp_path / "out", seed=5) == manifest


def test_prepare_plain_idx_source(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name, data in synthetic_files(1, 1).items():
        (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress(data))
    manifest = prepare_fashion_mnist(tmp_path / "out", source_dir=folder)
    assert manifest["totals"] == {"train": 10, "val": 10}


def test_prepare_existing_dir_without_manifest(synthetic_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    with pytest.raises(PreparedDirError, match="remove") as err:
        prepare_fashion_mnist(out, source_dir=synthetic_source)
    assert str(out) in str(err.value) and MANIFEST_NAME in str(err.value)


def test_prepare_detects_modified_tree(synthetic_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_fashion_mnist(out, source_dir=synthetic_source)
    victim = png_files(out / "val")[0]
    victim.unlink()
    with pytest.raises(PreparedDirError, match="modified") as err:
        prepare_fashion_mnist(out, source_dir=synthetic_source)
    assert str(victim.parent) in str(err.value)


def test_prepare_failure_leaves_nothing(synthetic_source: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    with pytest.raises(ValueError, match="only 3 images of class"):
        prepare_fashion_mnist(root / "out", source_dir=synthetic_source, train_per_class=4)
    assert list(root.iterdir()) == []  # neither out nor a temp folder


def test_prepare_bad_label_file(synthetic_source: Path, tmp_path: Path) -> None:
    bad = synthetic_source / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gz(idx_bytes(np.zeros(7, dtype=np.uint8))))  # 7 labels for 30 images
    with pytest.raises(ValueError, match="to match") as err:
        prepare_fashion_mnist(tmp_path / "out", source_dir=synthetic_source)
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_prepare_rejects_bad_subset_size(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="train_per_class"):
        prepare_fashion_mnist(tmp_path / "out", train_per_class=bad)  # type: ignore[arg-type]


def test_source_from_env(
    synthetic_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fm.SOURCE_ENV_VAR, str(synthetic_source))
    manifest = prepare_fashion_mnist(tmp_path / "out", train_per_class=1, val_per_class=1)
    assert manifest["source"]["kind"] == "env"
    assert manifest["source"]["dir"] == str(synthetic_source.resolve())


def test_explicit_source_missing_file(synthetic_source: Path, tmp_path: Path) -> None:
    (synthetic_source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FashionMNISTSourceError, match="t10k-labels-idx1-ubyte") as err:
        prepare_fashion_mnist(tmp_path / "out", source_dir=synthetic_source)
    assert str(synthetic_source) in str(err.value)


@needs_debian
def test_debian_source_is_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.SOURCE_ENV_VAR, raising=False)
    assert fm.find_fashion_mnist_source() == (fm.DEBIAN_SOURCE_DIR, "debian")


# ------------------------------------------------------------------------------------------
# download fallback (urlopen monkeypatched; no network)
# ------------------------------------------------------------------------------------------


class FakeServer:
    """Stands in for ``urllib.request.urlopen``, serving bytes by URL and logging requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requested: list[str] = []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.requested.append(url)
        name = url.removeprefix(fm.FASHION_MNIST_URL)
        if name not in self.files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return io.BytesIO(self.files[name])


def _trust(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    """Make the expected MD5 sums those of ``files`` (the real ones need the real bytes)."""
    for name, data in files.items():
        monkeypatch.setitem(fm.FASHION_MNIST_MD5, name, hashlib.md5(data).hexdigest())


@pytest.mark.usefixtures("no_local_source")
def test_download_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = synthetic_files()
    _trust(monkeypatch, files)
    server = FakeServer(files)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    cache = tmp_path / "cache"

    manifest = prepare_fashion_mnist(tmp_path / "out", cache_dir=cache, train_per_class=2)
    assert sorted(server.requested) == sorted(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + n for n in FILE_NAMES
    )
    assert manifest["source"] == {
        "kind": "download",
        "dir": str(cache.resolve()),
        "sha256": manifest["source"]["sha256"],
    }
    assert manifest["totals"] == {"train": 20, "val": 20}
    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILE_NAMES)  # no .part files

    # a second preparation reuses the verified cache without touching the network
    server.requested.clear()
    prepare_fashion_mnist(tmp_path / "out2", cache_dir=cache)
    assert server.requested == []


@pytest.mark.usefixtures("no_local_source")
def test_download_md5_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = synthetic_files()
    _trust(monkeypatch, files)
    altered = dict(files)
    altered["train-labels-idx1-ubyte.gz"] = files["train-labels-idx1-ubyte.gz"][:-1]
    monkeypatch.setattr(urllib.request, "urlopen", FakeServer(altered))
    cache = tmp_path / "cache"
    with pytest.raises(FashionMNISTSourceError, match="MD5") as err:
        prepare_fashion_mnist(tmp_path / "out", cache_dir=cache)
    message = str(err.value)
    assert "train-labels-idx1-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--source" in message
    assert not (cache / "train-labels-idx1-ubyte.gz").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_local_source")
def test_download_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float | None = None) -> io.BytesIO:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FashionMNISTSourceError, match="name resolution") as err:
        prepare_fashion_mnist(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_official_download_table() -> None:
    """The download fallback asks for exactly the four official files."""
    assert sorted(fm.FASHION_MNIST_MD5) == sorted(FILE_NAMES)
    assert all(
        len(md5) == 32 and set(md5) <= set("0123456789abcdef")
        for md5 in fm.FASHION_MNIST_MD5.values()
    )
    assert fm.FASHION_MNIST_URL.endswith("/")
    assert len(FASHION_MNIST_CLASSES) == 10 and len(set(FASHION_MNIST_CLASSES)) == 10
    assert all(name == os.path.basename(name) and name.isascii() for name in FASHION_MNIST_CLASSES)
