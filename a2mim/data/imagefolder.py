"""Image classification data in the ImageNet folder layout ``<root>/<split>/<class>/<image>``.

Building the dataset lists the folders and opens no image: at ImageNet scale opening and
verifying 1.28 M files costs ~0.7 min in every process (31 µs each), so a file is first decoded
when a sample is read. A file that fails to decode is then either an error naming it (default)
or, with ``on_corrupt="skip"`` (stage configs: ``data.skip_corrupt: true``), replaced by the next
readable sample with a logged warning naming it; it is never dropped silently.
:meth:`ImageFolderDataset.verify` runs the full up-front check (PIL ``verify()`` of every file)
where that is wanted, e.g. once after copying a dataset.

16-bit grayscale images (PNG/TIFF mode ``I;16``) are scaled to 8 bits (``round(v / 257)``)
before the RGB conversion; PIL's own conversion would clip them to 0/255.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMG_EXTENSIONS", "CorruptImageError", "ImageFolderDataset", "to_rgb"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_LAYOUT = "<root>/<split>/<class>/*.png (one folder per class; other image types also work)"
_SKIP_HINT = (
    "set data.skip_corrupt: true in the stage config (CLI: --set data.skip_corrupt=true; "
    'Python: on_corrupt="skip") to skip them'
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SHOWN = 5  # how many offending files an error or warning names


class CorruptImageError(ValueError):
    """One or more image files cannot be read or decoded.

    Attributes:
        paths: the offending files (may be a prefix of them in messages, never here).
    """

    def __init__(self, message: str, paths: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.paths = list(paths)

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``paths`` across DataLoader workers
        return (type(self), (str(self), self.paths))


def _describe(bad: Sequence[tuple[str, str]]) -> str:
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return shown + more


def _verify(path: str) -> str | None:
    """``None`` if PIL can open and verify ``path``, else the reason it cannot."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(err).__name__}: {err}"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit grayscale (``I;16*``, or ``I`` as PIL reads 16-bit
    PNG/TIFF) is scaled to 8 bits as ``round(v / 257)`` (65535 -> 255) instead of being clipped
    to 0/255 by PIL's ``convert``."""
    if img.mode in _SIXTEEN_BIT_MODES:
        v_hw = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and (v_hw.min() < 0 or v_hw.max() > 65535):
            raise ValueError(
                f"32-bit integer image with values in [{v_hw.min():.0f}, {v_hw.max():.0f}], "
                "outside the 16-bit range; convert it to 8 or 16 bits"
            )
        img = Image.fromarray(np.rint(v_hw / 257.0).astype(np.uint8))
    return img.convert("RGB")


def _list_images(class_dir: Path, extensions: tuple[str, ...]) -> list[str]:
    """Image files under ``class_dir`` (recursive, hidden entries skipped), sorted by path."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.join(dirpath, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(extensions)
        )
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Labelled images from ``<root>/<split>/<class>/<image>``.

    Classes are the sorted names of the (non-hidden) sub-folders of ``root/split``; targets
    index that sorted list. Samples are sorted by path, so the order is the same on every
    machine.

    Args:
        root: dataset root, e.g. the ``--out`` of ``prepare_fashion_mnist``.
        split: sub-folder of ``root`` (``"train"``, ``"val"``).
        transform: applied to the PIL RGB image (e.g. :mod:`a2mim.data.transforms`); with
            ``None`` ``__getitem__`` returns the PIL image itself.
        on_corrupt: what a file that fails to decode does when it is read: ``"error"`` raises
            :class:`CorruptImageError` naming it; ``"skip"`` logs a warning naming it, lists
            it in ``.skipped`` and returns the next readable sample instead (``index + 1``,
            ``index + 2``, ... wrapping around), so the replacement is deterministic.
        extensions: file-name endings (case-insensitive) that count as images.

    Attributes:
        classes: sorted class names. class_to_idx: name -> target.
        samples: ``(path, target)`` pairs. targets: the targets alone.
        skipped: corrupt files found so far in this process (by :meth:`verify`, or by reads
            with ``on_corrupt="skip"``; DataLoader workers keep their own lists).

    No image is opened while the dataset is built (see the module docstring).
    ``__getitem__(i)`` returns ``(transform(img), target)`` with ``img`` the image converted
    to RGB (grayscale is replicated to 3 channels), so a normalising transform yields a
    ``(3, H, W)`` float tensor. 16-bit grayscale is scaled to 8 bits first.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        on_corrupt: Literal["error", "skip"] = "error",
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f'on_corrupt must be "error" or "skip", got {on_corrupt!r}')
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        if not exts:
            raise ValueError("extensions must name at least one file ending, e.g. ('.png',)")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.extensions = exts

        split_dir = self.root / split
        if not split_dir.is_dir():
            what = "root folder" if not self.root.is_dir() else "split folder"
            missing = self.root if not self.root.is_dir() else split_dir
            raise FileNotFoundError(
                f"ImageFolderDataset: {what} {missing} does not exist; expected the layout "
                f"{_LAYOUT}"
            )
        self.classes = sorted(
            e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise FileNotFoundError(
                f"ImageFolderDataset: {split_dir} has no class sub-folders; expected the "
                f"layout {_LAYOUT}"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        candidates: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in self.classes:
            files = _list_images(split_dir / name, exts)
            if not files:
                empty.append(name)
            candidates.extend((path, self.class_to_idx[name]) for path in files)
        if empty:
            raise FileNotFoundError(
                f"ImageFolderDataset: class folder(s) {', '.join(empty)} under {split_dir} hold "
                f"no files ending in {', '.join(exts)}; every class needs images "
                f"(expected the layout {_LAYOUT}); remove the empty folders"
            )

        self.samples: list[tuple[str, int]] = candidates
        self.skipped: list[str] = []  # files found corrupt so far (by verify() or a read)
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def verify(self) -> list[str]:
        """Open and PIL-``verify()`` every file now (header, chunk checksums, truncation).

        With ``on_corrupt="error"`` a bad file raises :class:`CorruptImageError` naming the
        bad files; with ``"skip"`` they are removed from ``samples`` and ``targets``, added to
        ``skipped`` and named in one warning. Cheap checks only: a file can pass ``verify()``
        and still fail to decode its pixels, which a read then reports.

        Returns:
            The corrupt files found.
        """
        bad = [(path, reason) for path, _ in self.samples if (reason := _verify(path))]
        if not bad:
            return []
        split_dir = self.root / self.split
        if self.on_corrupt == "error":
            raise CorruptImageError(
                f"{len(bad)} of {len(self.samples)} image(s) under {split_dir} are corrupt or "
                f"unreadable: {_describe(bad)}. Replace or delete them, or {_SKIP_HINT}",
                paths=[path for path, _ in bad],
            )
        log.warning(
            "ImageFolderDataset: skipped %d corrupt or unreadable image(s) of %d under %s "
            "(on_corrupt='skip'): %s",
            len(bad),
            len(self.samples),
            split_dir,
            _describe(bad),
        )
        dropped = {path for path, _ in bad}
        self.skipped.extend(path for path, _ in bad if path not in self.skipped)
        self.samples = [(path, target) for path, target in self.samples if path not in dropped]
        self.targets = [target for _, target in self.samples]
        left = set(self.targets)
        lost = [c for c in self.classes if self.class_to_idx[c] not in left]
        if lost:
            raise CorruptImageError(
                f"after skipping corrupt images, class(es) {', '.join(lost)} under "
                f"{split_dir} have no images left; replace the corrupt files",
                paths=self.skipped,
            )
        return [path for path, _ in bad]

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``; :class:`CorruptImageError` naming the file
        if it fails to decode (whatever ``on_corrupt`` says; ``__getitem__`` applies it)."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise CorruptImageError(
                f"image {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                f"replace or delete it, or {_SKIP_HINT}",
                paths=[path],
            ) from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            at = (index + offset) % len(self.samples)
            try:
                img = self.load_image(at)
            except CorruptImageError as err:
                if self.on_corrupt == "error":
                    raise
                self._note_skipped(err.paths[0], str(err), index)
                continue
            target = self.samples[at][1]
            return (self.transform(img) if self.transform is not None else img), target
        raise CorruptImageError(
            f"every one of the {len(self.samples)} image(s) under {self.root / self.split} is "
            f"corrupt or unreadable; replace them",
            paths=self.skipped,
        )

    def _note_skipped(self, path: str, reason: str, index: int) -> None:
        if path in self.skipped:
            return
        self.skipped.append(path)
        log.warning(
            "ImageFolderDataset: skipping a corrupt image while reading sample %d "
            "(on_corrupt='skip'; the next readable sample is used): %s",
            index,
            reason,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={len(self.classes)}, skipped={len(self.skipped)})"
        )
