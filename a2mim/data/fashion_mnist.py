"""Fashion-MNIST: IDX reading and preparation into the ImageNet folder layout.

The prepared tree is what every image-classification stage reads through
:class:`a2mim.data.imagefolder.ImageFolderDataset`::

    <out_dir>/train/<class>/<index>.png     60,000 images (or a balanced subset)
    <out_dir>/val/<class>/<index>.png       10,000 images (the official t10k test set)
    <out_dir>/PREPARED.json                 manifest: counts, source, subset arguments

``<index>`` is the image's zero-padded position in its IDX file, so every PNG can be traced
back to the official data. Images are 28x28 8-bit grayscale PNGs (lossless).

Source files are looked up in this order: an explicit ``source_dir``, the environment variable
``A2MIM_FASHION_MNIST_DIR``, the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); if none is given and the Debian path is absent, the
four official files are downloaded from Zalando's server into a cache folder and checked
against their published MD5 sums.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEBIAN_SOURCE_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_URL",
    "MANIFEST_NAME",
    "SOURCE_ENV_VAR",
    "FashionMNISTSourceError",
    "PreparedDirError",
    "find_fashion_mnist_source",
    "prepare_fashion_mnist",
    "read_idx",
]

log = logging.getLogger(__name__)

# Official class names (label 0..9) made filesystem-safe; the order is the label order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# MD5 sums of the official gzip files, as published by Zalando Research. (The Debian package
# re-writes the gzip headers, so its .gz files hash differently; their content is identical.)
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# Prepared split name -> (images file stem, labels file stem).
_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SOURCE_ENV_VAR = "A2MIM_FASHION_MNIST_DIR"
CACHE_ENV_VAR = "A2MIM_CACHE_DIR"
DEBIAN_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
MANIFEST_NAME = "PREPARED.json"
_FORMAT_VERSION = 1
_INSTALL_HINT = (
    "install the Debian package (`apt-get install dataset-fashion-mnist`) or pass "
    "`--source DIR` (a folder holding the four official *-ubyte[.gz] files)"
)

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX format").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class FashionMNISTSourceError(FileNotFoundError):
    """No usable Fashion-MNIST source files were found or could be downloaded."""


class PreparedDirError(FileExistsError):
    """The output folder exists but was not prepared with the requested arguments."""


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, detected from its first bytes).

    Layout: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of dims,
    one big-endian uint32 per dim, then the data in C order, big-endian.

    Returns:
        Array of shape ``dims`` in native byte order (uint8 for the Fashion-MNIST files).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: wrong magic number, unknown type code, zero dims, or a byte count that
            does not match the header (truncated or garbled file); the message names the file.
    """
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"IDX file {path} is not a valid gzip stream ({err}); the file is truncated "
                "or corrupt: delete it and obtain a fresh copy"
            ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"IDX file {path} has a wrong magic number {raw[:4].hex() or '(empty file)'}: "
            "an IDX file starts with two zero bytes, a type code and the number of dims"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"IDX file {path} has unknown type code 0x{type_code:02X} (known: {known})"
        )
    if ndim == 0:
        raise ValueError(f"IDX file {path} declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its "
            f"{header_len}-byte header"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {path} is {state}: header says dims {dims} of {dtype.name} "
            f"({expected} bytes in all), the file holds {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


# --------------------------------------------------------------------------------------------
# Source lookup and download
# --------------------------------------------------------------------------------------------


def _source_file(folder: Path, stem: str) -> Path | None:
    """The ``stem.gz`` or plain ``stem`` file in ``folder``, whichever exists (gz first)."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    stems = [stem for pair in _SPLIT_FILES.values() for stem in pair]
    return [f"{s}[.gz]" for s in stems if _source_file(folder, s) is None]


def _default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]) / "fashion-mnist"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "a2mim" / "fashion-mnist"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _download_official(cache_dir: Path, timeout_s: float = 60.0) -> Path:
    """Download the four official .gz files into ``cache_dir`` (MD5-checked, atomic writes).

    Files already in the cache with the right MD5 are kept. Any failure raises
    :class:`FashionMNISTSourceError` with the install hint.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, md5 in FASHION_MNIST_MD5.items():
        target = cache_dir / name
        if target.is_file() and _md5(target.read_bytes()) == md5:
            continue
        url = FASHION_MNIST_URL + name
        log.info("downloading %s -> %s", url, target)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                data = response.read()
        except Exception as err:  # URLError, HTTPError, timeouts, refused connections, ...
            raise FashionMNISTSourceError(
                f"no Fashion-MNIST source found locally and downloading {url} failed ({err}); "
                f"{_INSTALL_HINT}"
            ) from err
        got = _md5(data)
        if got != md5:
            raise FashionMNISTSourceError(
                f"downloaded {url} has MD5 {got}, expected {md5} (incomplete or altered "
                f"download; nothing was written to {cache_dir}); {_INSTALL_HINT}"
            )
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return cache_dir


def find_fashion_mnist_source(
    source_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """Locate (or download) the four Fashion-MNIST IDX files.

    Order: ``source_dir``; ``$A2MIM_FASHION_MNIST_DIR``; ``DEBIAN_SOURCE_DIR``; download into
    ``cache_dir`` (default ``$A2MIM_CACHE_DIR/fashion-mnist`` or
    ``~/.cache/a2mim/fashion-mnist``). An explicitly named folder (argument or environment
    variable) that lacks a file is an error rather than silently skipped.

    Returns:
        ``(folder, kind)`` with kind one of ``"explicit"``, ``"env"``, ``"debian"``,
        ``"download"``.
    """
    explicit = [
        (source_dir, "explicit", "--source"),
        (os.environ.get(SOURCE_ENV_VAR) or None, "env", f"${SOURCE_ENV_VAR}"),
    ]
    for folder, kind, origin in explicit:
        if folder is None:
            continue
        folder = Path(folder)
        missing = _missing_files(folder)
        if missing:
            raise FashionMNISTSourceError(
                f"Fashion-MNIST source folder {folder} (from {origin}) lacks {', '.join(missing)}; "
                f"point {origin} at a folder holding the four official files, or unset it and "
                f"{_INSTALL_HINT}"
            )
        return folder, kind
    if DEBIAN_SOURCE_DIR.is_dir() and not _missing_files(DEBIAN_SOURCE_DIR):
        return DEBIAN_SOURCE_DIR, "debian"
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return _download_official(cache), "download"


def _load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Images (N, 28, 28) uint8, labels (N,) uint8, and SHA-256 of the decompressed files."""
    image_stem, label_stem = _SPLIT_FILES[split]
    image_path = _source_file(folder, image_stem)
    label_path = _source_file(folder, label_stem)
    assert image_path is not None and label_path is not None  # checked by the lookup
    images_nhw, labels_n = read_idx(image_path), read_idx(label_path)
    if images_nhw.dtype != np.uint8 or images_nhw.ndim != 3 or images_nhw.shape[1:] != (28, 28):
        raise ValueError(
            f"{image_path} holds {images_nhw.dtype} data of shape {images_nhw.shape}; "
            "Fashion-MNIST images are uint8 of shape (N, 28, 28)"
        )
    if labels_n.dtype != np.uint8 or labels_n.ndim != 1 or len(labels_n) != len(images_nhw):
        raise ValueError(
            f"{label_path} holds {labels_n.dtype} data of shape {labels_n.shape}; expected "
            f"uint8 labels of shape ({len(images_nhw)},) to match {image_path}"
        )
    if len(labels_n) and int(labels_n.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path} holds label {int(labels_n.max())}; expected 0..9")
    digests = {
        image_stem: hashlib.sha256(images_nhw.tobytes()).hexdigest(),
        label_stem: hashlib.sha256(labels_n.tobytes()).hexdigest(),
    }
    return images_nhw, labels_n, digests


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def _select_indices(
    labels_n: np.ndarray, per_class: int | None, rng: np.random.Generator, split: str
) -> dict[int, np.ndarray]:
    """Per class, the sorted indices to write: all of them, or ``per_class`` drawn at random."""
    chosen: dict[int, np.ndarray] = {}
    for label in range(len(FASHION_MNIST_CLASSES)):
        idx = np.flatnonzero(labels_n == label)
        if per_class is not None:
            if per_class > len(idx):
                raise ValueError(
                    f"{split}_per_class={per_class} but the {split} split has only {len(idx)} "
                    f"images of class {FASHION_MNIST_CLASSES[label]!r}"
                )
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        chosen[label] = idx
    return chosen


def _write_split(
    images_nhw: np.ndarray, chosen: Mapping[int, np.ndarray], split_dir: Path
) -> dict[str, int]:
    counts: dict[str, int] = {}
    width = max(5, len(str(len(images_nhw) - 1)))
    for label, idx in chosen.items():
        class_dir = split_dir / FASHION_MNIST_CLASSES[label]
        class_dir.mkdir(parents=True)
        for i in idx:
            Image.fromarray(images_nhw[i]).save(class_dir / f"{i:0{width}d}.png", format="PNG")
        counts[FASHION_MNIST_CLASSES[label]] = len(idx)
    return counts


def _subset_args(train_per_class: int | None, val_per_class: int | None, seed: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
    }


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    complete = (
        isinstance(manifest, dict)
        and manifest.get("complete") is True
        and isinstance(manifest.get("counts"), dict)
    )
    return manifest if complete else None


def _check_existing(out_dir: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """Return the manifest of an existing ``out_dir`` that matches ``wanted``, else raise."""
    manifest = _read_manifest(out_dir)
    fix = f"remove {out_dir} or choose another --out"
    if manifest is None:
        raise PreparedDirError(
            f"{out_dir} exists but has no complete {MANIFEST_NAME}, so it was not written by "
            f"prepare_fashion_mnist (or was interrupted or edited); {fix}"
        )
    if wanted["train_per_class"] is None and wanted["val_per_class"] is None:
        wanted = {k: v for k, v in wanted.items() if k != "seed"}  # no subset: seed unused
    have = {k: manifest.get(k) for k in wanted}
    if have != wanted:
        diff = ", ".join(
            f"{k}: {have[k]!r} there, {wanted[k]!r} asked" for k in wanted if have[k] != wanted[k]
        )
        raise PreparedDirError(f"{out_dir} was prepared with other arguments ({diff}); {fix}")
    for split, class_counts in manifest["counts"].items():
        for class_name, count in class_counts.items():
            class_dir = out_dir / split / class_name
            found = len(list(class_dir.glob("*.png"))) if class_dir.is_dir() else 0
            if found != count:
                raise PreparedDirError(
                    f"{class_dir} holds {found} PNGs but {MANIFEST_NAME} lists {count}; "
                    f"the prepared tree was modified: {fix}"
                )
    return manifest


def prepare_fashion_mnist(
    out_dir: str | os.PathLike[str],
    source_dir: str | os.PathLike[str] | None = None,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write Fashion-MNIST as ``out_dir/{train,val}/<class>/<index>.png`` plus a manifest.

    Args:
        out_dir: folder to create; must not exist unless it holds a matching manifest.
        source_dir: folder with the four official IDX files (``.gz`` or plain); see
            :func:`find_fashion_mnist_source` for the fallbacks.
        train_per_class: if set, write this many train images per class (balanced subset).
        val_per_class: likewise for the val (t10k) split.
        seed: seeds the subset choice (ignored when both subset sizes are ``None``).
        cache_dir: where the download fallback stores the official files.

    Returns:
        The manifest written to ``out_dir/PREPARED.json``: subset arguments, ``classes``,
        ``counts`` (split -> class -> number of images), ``totals``, ``source``.

    The tree is built in a temporary folder beside ``out_dir`` and renamed into place, so an
    interrupted run leaves nothing at ``out_dir``. A second call with the same arguments
    returns the existing manifest without writing anything.
    """
    out_dir = Path(out_dir)
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    wanted = _subset_args(train_per_class, val_per_class, seed)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder (Snakemake creates its outputs' parents) is no dataset
    if out_dir.exists():
        return _check_existing(out_dir, wanted)

    folder, kind = find_fashion_mnist_source(source_dir, cache_dir)
    log.info("preparing Fashion-MNIST from %s (%s) into %s", folder, kind, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        counts: dict[str, dict[str, int]] = {}
        digests: dict[str, str] = {}
        per_class = {"train": train_per_class, "val": val_per_class}
        for split_code, split in enumerate(_SPLIT_FILES):
            images_nhw, labels_n, split_digests = _load_split(folder, split)
            rng = np.random.default_rng([seed, split_code])
            chosen = _select_indices(labels_n, per_class[split], rng, split)
            counts[split] = _write_split(images_nhw, chosen, tmp_dir / split)
            digests.update(split_digests)
        manifest = {
            **wanted,
            "dataset": "fashion-mnist",
            "classes": list(FASHION_MNIST_CLASSES),
            "counts": counts,
            "totals": {split: sum(c.values()) for split, c in counts.items()},
            "image": {"height": 28, "width": 28, "mode": "L", "format": "PNG"},
            "source": {"kind": kind, "dir": str(folder.resolve()), "sha256": digests},
            "complete": True,
        }
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if out_dir.exists():  # another process finished first: accept it if it matches
                return _check_existing(out_dir, wanted)
            raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("prepared %s: %s", out_dir, manifest["totals"])
    return manifest
