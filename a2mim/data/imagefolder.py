"""Image classification data in the ImageNet folder layout ``<root>/<split>/<class>/<image>``.

Every image is checked when the dataset is built (PIL open + ``verify()``: header, chunk
checksums, truncation; about 30 µs per small PNG), so a broken file stops the run before
training starts rather than hours into it. Bad files are either an error (default) or skipped
with a logged warning; they are never dropped silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMG_EXTENSIONS", "CorruptImageError", "ImageFolderDataset"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_LAYOUT = "<root>/<split>/<class>/*.png (one folder per class; other image types also work)"
_SKIP_HINT = 'pass on_corrupt="skip" (CLI: --skip-corrupt) to skip them'
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
        on_corrupt: ``"error"`` raises :class:`CorruptImageError` naming the bad files;
            ``"skip"`` drops them, lists them in ``.skipped`` and logs a warning.
        extensions: file-name endings (case-insensitive) that count as images.

    Attributes:
        classes: sorted class names. class_to_idx: name -> target.
        samples: ``(path, target)`` pairs. targets: the targets alone.
        skipped: paths dropped as corrupt (empty with ``on_corrupt="error"``).

    ``__getitem__(i)`` returns ``(transform(img), target)`` with ``img`` the image converted
    to RGB (grayscale is replicated to 3 channels), so a normalising transform yields a
    ``(3, H, W)`` float tensor.
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

        bad: list[tuple[str, str]] = []
        self.samples: list[tuple[str, int]] = []
        for path, target in candidates:
            reason = _verify(path)
            if reason is None:
                self.samples.append((path, target))
            else:
                bad.append((path, reason))
        self.skipped: list[str] = []
        if bad and on_corrupt == "error":
            raise CorruptImageError(
                f"{len(bad)} of {len(candidates)} image(s) under {split_dir} are corrupt or "
                f"unreadable: {_describe(bad)}. Replace or delete them, or {_SKIP_HINT}",
                paths=[path for path, _ in bad],
            )
        if bad:
            self.skipped = [path for path, _ in bad]
            log.warning(
                "ImageFolderDataset: skipped %d corrupt or unreadable image(s) of %d under %s "
                "(on_corrupt='skip'): %s",
                len(bad),
                len(candidates),
                split_dir,
                _describe(bad),
            )
            left = {target for _, target in self.samples}
            lost = [c for c in self.classes if self.class_to_idx[c] not in left]
            if lost:
                raise CorruptImageError(
                    f"after skipping corrupt images, class(es) {', '.join(lost)} under "
                    f"{split_dir} have no images left; replace the corrupt files",
                    paths=self.skipped,
                )
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``; :class:`CorruptImageError` if it fails to
        decode (whatever ``on_corrupt`` says, since the sample was already promised)."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as err:
            raise CorruptImageError(
                f"image {path} passed the check at dataset construction but fails to decode "
                f"({type(err).__name__}: {err}); replace or delete it",
                paths=[path],
            ) from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        target = self.samples[index][1]
        return (self.transform(img) if self.transform is not None else img), target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={len(self.classes)}, skipped={len(self.skipped)})"
        )
