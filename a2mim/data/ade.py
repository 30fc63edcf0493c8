"""ADE20K-layout semantic segmentation dataset (images + single-channel label PNGs).

Layout (the ADEChallengeData2016 release)::

    root/images/{training,validation}/<stem>.jpg       (.jpeg and .png are accepted too)
    root/annotations/{training,validation}/<stem>.png  (mode L or P, values 0..num_classes;
                                                        16-bit grayscale I;16 is read as is)

Images are read as 8-bit RGB; a 16-bit grayscale image is scaled as ``round(v / 257)``
(:func:`a2mim.data.imagefolder.to_rgb`), never clipped to 0/255. A 16-bit *label* PNG keeps its
integer values (no scaling: they are class ids) and is checked against ``num_classes`` and the
label convention like an 8-bit one.

Label convention of ADE20K: 0 means "other / not annotated", 1..150 are the classes. With
``reduce_zero_label=True`` (the mmsegmentation setting for ADE20K) 0 becomes ``ignore_index``
(255) and ``v`` becomes ``v - 1``, so the model predicts ``0..num_classes-1``. With
``reduce_zero_label=False`` the stored values are used as they are: ``0..num_classes-1`` are
classes and ``ignore_index`` marks ignored pixels.

Label conventions (``reduce_zero_label``, a dataset setting of the ``segment`` stage with
``num_classes``; nothing is guessed from the files):

- ``true`` (ADE20K, mmseg's ``reduce_zero_label``): raw 0 = ignored ("other"), 1..K = classes;
- ``false`` (Cityscapes-style and most custom sets): raw 0..K-1 = classes, ``ignore_index``
  (usually 255) = void.

Construction checks the file pairing, sizes and label modes (image headers only, which is
cheap); label values are checked when an item is loaded, and `validate_root` checks the layout
and scans a sample of label files against the convention before anything trains. Every error
names the file and the setting to change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from a2mim.config import ConfigError
from a2mim.data.imagefolder import to_rgb

__all__ = ["ADE20KSegmentation", "AdeLayoutError", "reduce_zero_label", "validate_root"]

SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")  # single-channel integer
LABEL_MODES_TEXT = "8-bit L or P, or 16-bit grayscale I;16"
LAYOUT = (
    "images/training/*.jpg, images/validation/*.jpg, annotations/training/*.png and "
    "annotations/validation/*.png (the ADEChallengeData2016 layout; one single-channel label "
    "PNG per image, same stem)"
)

Transforms = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def reduce_zero_label(label_hw: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Map ADE20K raw labels to training labels: 0 -> ``ignore_index``, v -> v - 1.

    Args:
        label_hw: integer array (H, W) of raw labels.

    Returns:
        int64 array (H, W).
    """
    label_hw = label_hw.astype(np.int64)
    return np.where(label_hw == 0, ignore_index, label_hw - 1)


def read_label(path: Path) -> np.ndarray:
    """A label PNG's class values as an integer (H, W) array: mode P gives palette indices
    (the class values), 16-bit grayscale its integers unscaled."""
    with Image.open(path) as label:
        if label.mode not in LABEL_MODES:
            raise ValueError(
                f"{path}: label image has mode {label.mode!r}; it must be a single-channel PNG "
                f"of class values ({LABEL_MODES_TEXT})"
            )
        values_hw = np.asarray(label)
    return values_hw.astype(np.int64) if values_hw.dtype.kind in "ui" else values_hw


class ADE20KSegmentation(torch.utils.data.Dataset):
    """Semantic segmentation pairs ``(img_chw, label_hw)`` in the ADE20K folder layout.

    Args:
        root: dataset root holding ``images/`` and ``annotations/``.
        split: "training" or "validation".
        transforms: optional ``f(img_chw, label_hw) -> (img_chw, label_hw)`` applied last.
        reduce_zero_label: map 0 to ``ignore_index`` and shift 1..num_classes down by one.
        num_classes: number of classes the model predicts. Raw label values may be
            ``0..num_classes`` with ``reduce_zero_label``, else ``0..num_classes-1`` or
            ``ignore_index``.
        ignore_index: value of ignored pixels in the returned labels.

    Items: ``img_chw`` float32 (3, H, W) in [0, 1]; ``label_hw`` int64 (H, W) with values in
    ``0..num_classes-1`` or ``ignore_index``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Transforms | None = None,
        reduce_zero_label: bool = True,
        num_classes: int = 150,
        ignore_index: int = 255,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 1 <= num_classes < ignore_index <= 255:
            raise ValueError(
                f"need 1 <= num_classes < ignore_index <= 255, got num_classes={num_classes}, "
                f"ignore_index={ignore_index}"
            )
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.image_dir = self.root / "images" / split
        self.label_dir = self.root / "annotations" / split
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"missing folder {folder}; expected root/images/{split} and "
                    f"root/annotations/{split} under {self.root}"
                )
        self.samples: list[tuple[Path, Path]] = self._pair_files()

    def _pair_files(self) -> list[tuple[Path, Path]]:
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {self.image_dir}"
            )
        samples = []
        for image_path in images:
            label_path = self.label_dir / f"{image_path.stem}.png"
            if not label_path.is_file():
                raise FileNotFoundError(
                    f"missing annotation for image {image_path}: expected {label_path}"
                )
            with Image.open(image_path) as image, Image.open(label_path) as label:
                image_size, label_size, label_mode = image.size, label.size, label.mode
            if label_mode not in LABEL_MODES:
                raise ValueError(
                    f"{label_path}: label image has mode {label_mode!r}; it must be a "
                    f"single-channel PNG of class values ({LABEL_MODES_TEXT}), not a "
                    f"color rendering of the labels"
                )
            if image_size != label_size:
                raise ValueError(
                    f"size mismatch: image {image_path} is {image_size[0]}x{image_size[1]} "
                    f"(WxH) but label {label_path} is {label_size[0]}x{label_size[1]}"
                )
            samples.append((image_path, label_path))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        """Training label of item ``index``: int64 array (H, W), range-checked."""
        label_path = self.samples[index][1]
        raw_hw = read_label(label_path)
        present = np.unique(raw_hw)
        if self.reduce_zero_label:
            bad = present[(present > self.num_classes) | (present < 0)]
            allowed = f"0..{self.num_classes} (0 = ignored)"
        else:
            bad = present[
                ((present >= self.num_classes) & (present != self.ignore_index)) | (present < 0)
            ]
            allowed = f"0..{self.num_classes - 1} or {self.ignore_index} (ignored)"
        if bad.size:
            raise ValueError(
                f"{label_path}: label values {bad.tolist()} exceed num_classes="
                f"{self.num_classes} (allowed {allowed}); set num_classes to match the "
                f"dataset or fix the label file"
            )
        if self.reduce_zero_label:
            return reduce_zero_label(raw_hw, self.ignore_index)
        return raw_hw.astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path = self.samples[index][0]
        with Image.open(image_path) as image:
            rgb_hwc = np.asarray(to_rgb(image))  # 16-bit grayscale: round(v / 257), not 0/255
        img_chw = torch.from_numpy(rgb_hwc.copy()).permute(2, 0, 1).float().div_(255.0)
        label_hw = torch.from_numpy(self.load_label(index))
        if self.transforms is not None:
            img_chw, label_hw = self.transforms(img_chw, label_hw)
        return img_chw, label_hw


class AdeLayoutError(ConfigError):
    """A dataset root does not hold the ADE20K layout, or its labels break the convention."""


def _convention(reduce_zero: bool, num_classes: int, ignore_index: int) -> str:
    if reduce_zero:
        return f"data.reduce_zero_label: true reads 0 as ignored and 1..{num_classes} as classes"
    return (
        f"data.reduce_zero_label: false reads 0..{num_classes - 1} as classes and "
        f"{ignore_index} as ignored"
    )


def _check_values(
    values: np.ndarray, path: Path, reduce_zero: bool, num_classes: int, ignore_index: int
) -> None:
    """Raise `AdeLayoutError` when a label file's ``values`` break the convention, saying which
    setting to change."""
    rule = _convention(reduce_zero, num_classes, ignore_index)
    if reduce_zero:
        bad = values[(values > num_classes) | (values < 0)]
        classes = values[values != ignore_index]
        if (
            bad.size
            and set(bad.tolist()) == {ignore_index}
            and classes.max(initial=0) < num_classes
        ):
            hint = (
                f"the file holds {ignore_index} and classes below {num_classes}: it looks like "
                f"the 0..K-1 + void convention; set data.reduce_zero_label: false"
            )
        else:
            hint = "set data.num_classes to the number of classes of this dataset"
    else:
        bad = values[((values >= num_classes) & (values != ignore_index)) | (values < 0)]
        if bad.size and bad.max() == num_classes and ignore_index not in values:
            hint = (
                f"values reach {num_classes}: it looks like the ADE convention (0 = ignored, "
                f"1..K); set data.reduce_zero_label: true"
            )
        else:
            hint = "set data.num_classes (or data.ignore_index) to match this dataset"
    if bad.size:
        raise AdeLayoutError(
            f"{path}: label values {sorted(set(bad.tolist()))[:10]} are outside the convention "
            f"({rule}); {hint}"
        )


def validate_root(
    root: str | Path,
    num_classes: int,
    reduce_zero_label: bool = True,
    ignore_index: int = 255,
    splits: tuple[str, ...] = SPLITS,
    sample: int = 8,
) -> dict[str, object]:
    """Check, cheaply, that ``root`` holds the ADE20K layout (`LAYOUT`) and that its labels fit
    ``num_classes`` and the label convention, before anything is trained or submitted.

    For each split: both folders exist and are not empty, and ``sample`` images spread over the
    sorted list have a label PNG of the same stem and size in mode L or P, whose values fit the
    convention (see the module docstring). Raises `AdeLayoutError` naming the expected layout or
    the setting to change; returns what was scanned:
    ``{"root", "label_files_scanned", "values_seen": [min, max], "ignore_seen"}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise AdeLayoutError(f"ADE20K root {root} is not a folder; expected {LAYOUT}")
    if not 1 <= num_classes < ignore_index <= 255:
        raise AdeLayoutError(
            f"need 1 <= data.num_classes < data.ignore_index <= 255, got {num_classes} and "
            f"{ignore_index}"
        )
    scanned, low, high, ignore_seen = 0, 255, 0, False
    for split in splits:
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise AdeLayoutError(f"{root}: missing folder {folder}; expected {LAYOUT}")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise AdeLayoutError(f"{image_dir} holds no images; expected {LAYOUT}")
        picks = sorted({round(i * (len(images) - 1) / max(sample - 1, 1)) for i in range(sample)})
        for image_path in (images[i] for i in picks):
            label_path = label_dir / f"{image_path.stem}.png"
            if not label_path.is_file():
                raise AdeLayoutError(
                    f"image {image_path} has no label {label_path}; expected {LAYOUT}"
                )
            with Image.open(image_path) as image, Image.open(label_path) as label:
                image_size, mode = image.size, label.mode
            if mode not in LABEL_MODES:
                raise AdeLayoutError(
                    f"{label_path}: label image has mode {mode!r}; labels must be single-channel "
                    f"PNGs ({LABEL_MODES_TEXT}) holding class values, not color renderings"
                )
            values_hw = read_label(label_path)
            if values_hw.shape[::-1] != image_size:
                raise AdeLayoutError(
                    f"size mismatch: image {image_path} is {image_size[0]}x{image_size[1]} (WxH) "
                    f"but label {label_path} is {values_hw.shape[1]}x{values_hw.shape[0]}"
                )
            values = np.unique(values_hw)
            _check_values(values, label_path, reduce_zero_label, num_classes, ignore_index)
            scanned += 1
            low, high = min(low, int(values.min())), max(high, int(values.max()))
            ignore_seen |= bool(not reduce_zero_label and ignore_index in values)
    return {
        "root": str(root),
        "label_files_scanned": scanned,
        "values_seen": [low, high],
        "ignore_seen": ignore_seen if not reduce_zero_label else bool(low == 0),
    }
