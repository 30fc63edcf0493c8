"""ADE20K-layout semantic segmentation dataset (images + single-channel label PNGs).

Layout (the ADEChallengeData2016 release)::

    root/images/{training,validation}/<stem>.jpg       (.jpeg and .png are accepted too)
    root/annotations/{training,validation}/<stem>.png  (mode L or P, values 0..num_classes)

Label convention of ADE20K: 0 means "other / not annotated", 1..150 are the classes. With
``reduce_zero_label=True`` (the mmsegmentation setting for ADE20K) 0 becomes ``ignore_index``
(255) and ``v`` becomes ``v - 1``, so the model predicts ``0..num_classes-1``. With
``reduce_zero_label=False`` the stored values are used as they are: ``0..num_classes-1`` are
classes and ``ignore_index`` marks ignored pixels.

Construction checks the file pairing, sizes and label modes (image headers only, which is
cheap); label values are checked when an item is loaded. Every error names the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["ADE20KSegmentation", "reduce_zero_label"]

SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P")

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
                    f"single-channel 8-bit PNG (mode {' or '.join(LABEL_MODES)}), not a "
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
        with Image.open(label_path) as label:
            # Mode P yields palette indices, which are the class values.
            raw_hw = np.asarray(label)
        present = np.unique(raw_hw)
        if self.reduce_zero_label:
            bad = present[present > self.num_classes]
            allowed = f"0..{self.num_classes} (0 = ignored)"
        else:
            bad = present[(present >= self.num_classes) & (present != self.ignore_index)]
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
            rgb_hwc = np.asarray(image.convert("RGB"))
        img_chw = torch.from_numpy(rgb_hwc.copy()).permute(2, 0, 1).float().div_(255.0)
        label_hw = torch.from_numpy(self.load_label(index))
        if self.transforms is not None:
            img_chw, label_hw = self.transforms(img_chw, label_hw)
        return img_chw, label_hw
