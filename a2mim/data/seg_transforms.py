"""mmsegmentation's ADE20K pipelines on tensors: what the segmentation stage trains and tests on.

Training (mmseg ``configs/_base_/datasets/ade20k.py``), in this order:

1. ``Resize(img_scale, ratio_range)``: a ratio ``r ~ U(ratio_range)`` scales the target
   ``(long, short) = img_scale * r``; the image is rescaled, keeping its aspect ratio, to the
   largest size within that target (bilinear; labels nearest);
2. ``RandomCrop(crop_size, cat_max_ratio)``: up to 10 draws of the crop window until no single
   class covers ``cat_max_ratio`` or more of its labelled pixels;
3. ``RandomFlip(hflip)`` (horizontal);
4. ``PhotoMetricDistortion``: brightness, contrast, saturation and hue, each applied with
   probability 1/2, contrast either first or last (see `photometric_distortion`);
5. ``Normalize`` (ImageNet mean / std);
6. ``Pad(crop_size)``: image with 0, label with ``ignore_index`` (bottom and right).

Test: ``Resize(img_scale)`` keeping the ratio, then ``Normalize``; the prediction is compared with
the label at its original size (the stage resizes the logits back).

Images enter as ``img_chw`` float in [0, 1] (`a2mim.data.ade.ADE20KSegmentation` items) and are
processed in mmseg's 0..255 range. Every random draw comes from the ``numpy.random.Generator``
the caller passes, so a sample's augmentation is a function of its seed alone (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage import color

from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "SegTrainTransform",
    "eval_input",
    "normalize",
    "pad_to",
    "photometric_distortion",
    "random_crop",
    "rescale_size",
    "resize_pair",
]

CROP_TRIES = 10  # mmseg RandomCrop: redraws while one class dominates the crop


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """``(h, w)`` of an image rescaled, keeping its ratio, to fit ``scale = (long, short)``
    (mmcv ``rescale_size``: the largest factor with long side <= long and short side <= short,
    sizes rounded half up)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(
    img_chw: torch.Tensor, label_hw: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image bilinear (half-pixel centres, no antialiasing: OpenCV ``INTER_LINEAR``), label
    nearest (``floor`` source index, as OpenCV ``INTER_NEAREST``)."""
    if tuple(img_chw.shape[-2:]) == tuple(size):
        return img_chw, label_hw
    img = F.interpolate(img_chw[None], size=size, mode="bilinear", align_corners=False)[0]
    if label_hw is None:
        return img, None
    label = F.interpolate(label_hw[None, None].float(), size=size, mode="nearest")[0, 0]
    return img, label.to(label_hw.dtype)


def random_crop(
    img_chw: torch.Tensor,
    label_hw: torch.Tensor,
    crop: int,
    cat_max_ratio: float,
    ignore_index: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop x crop`` window (smaller where the image is smaller), redrawn up to
    `CROP_TRIES` times while it holds a single class or one class covers ``cat_max_ratio`` or
    more of its labelled pixels (mmseg ``RandomCrop``; ``cat_max_ratio >= 1`` disables that)."""
    height, width = label_hw.shape

    def window() -> tuple[int, int]:
        top = int(rng.integers(0, max(height - crop, 0) + 1))
        left = int(rng.integers(0, max(width - crop, 0) + 1))
        return top, left

    top, left = window()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            part = label_hw[top : top + crop, left : left + crop]
            _, counts = torch.unique(part[part != ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = window()
    rows, cols = slice(top, top + crop), slice(left, left + crop)
    return img_chw[:, rows, cols], label_hw[rows, cols]


def photometric_distortion(img_chw: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` on a 0..255 float image, each step with probability 1/2:
    brightness ``+ U(-32, 32)``; contrast ``* U(0.5, 1.5)`` (before or after the next two,
    chosen at random); saturation ``S * U(0.5, 1.5)`` in HSV; hue ``H + d`` degrees with
    ``d`` an integer in ``[-18, 18)``. Values are clipped to 0..255 after each step.

    Draw order and ranges are mmseg's. Two fixes: mmseg shifts OpenCV's float hue (degrees)
    and takes it modulo 180, which folds hues above 180 degrees onto the other half of the
    circle; here the hue turns modulo 360. Saturation is clipped to [0, 1] (mmseg clips the
    scaled S at 255, letting it exceed 1).
    """
    img = img_chw.clone()
    if rng.integers(2):
        img = (img + float(rng.uniform(-32, 32))).clamp_(0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: torch.Tensor) -> torch.Tensor:
        if rng.integers(2):
            return (x * float(rng.uniform(0.5, 1.5))).clamp_(0, 255)
        return x

    if contrast_first:
        img = contrast(img)
    saturation = float(rng.uniform(0.5, 1.5)) if rng.integers(2) else None
    hue = int(rng.integers(-18, 18)) if rng.integers(2) else None
    if saturation is not None or hue is not None:
        hsv_hwc = color.rgb2hsv(img.permute(1, 2, 0).numpy() / 255.0)
        if saturation is not None:
            hsv_hwc[..., 1] = np.clip(hsv_hwc[..., 1] * saturation, 0.0, 1.0)
        if hue is not None:
            hsv_hwc[..., 0] = (hsv_hwc[..., 0] + hue / 360.0) % 1.0
        rgb_hwc = color.hsv2rgb(hsv_hwc) * 255.0
        img = torch.from_numpy(rgb_hwc).permute(2, 0, 1).to(img.dtype).clamp_(0, 255)
    if not contrast_first:
        img = contrast(img)
    return img


def normalize(img_chw: torch.Tensor) -> torch.Tensor:
    """0..255 image -> ImageNet-normalised (mmseg's mean 123.675... / std 58.395...)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img_chw.dtype).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=img_chw.dtype).view(3, 1, 1) * 255.0
    return (img_chw - mean) / std


def pad_to(
    img_chw: torch.Tensor, label_hw: torch.Tensor, size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom / right up to ``size x size``: image with 0, label with ``ignore_index``."""
    pad_h, pad_w = size - img_chw.shape[1], size - img_chw.shape[2]
    if pad_h <= 0 and pad_w <= 0:
        return img_chw, label_hw
    pad = (0, max(pad_w, 0), 0, max(pad_h, 0))
    return F.pad(img_chw, pad, value=0.0), F.pad(label_hw, pad, value=ignore_index)


@dataclass(frozen=True)
class SegTrainTransform:
    """The mmseg ADE20K training pipeline (module docstring); ``__call__(img_chw in [0, 1],
    label_hw, rng) -> (img (3, crop, crop) normalised, label (crop, crop) int64)``."""

    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __call__(
        self, img_chw: torch.Tensor, label_hw: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.ratio_range
        ratio = float(rng.random()) * (hi - lo) + lo
        target = (self.img_scale[0] * ratio, self.img_scale[1] * ratio)
        size = rescale_size(img_chw.shape[1], img_chw.shape[2], target)
        img, label = resize_pair(img_chw * 255.0, label_hw, size)
        img, label = random_crop(
            img, label, self.crop_size, self.cat_max_ratio, self.ignore_index, rng
        )
        if rng.random() < self.hflip:
            img, label = img.flip(-1), label.flip(-1)
        if self.photometric:
            img = photometric_distortion(img, rng)
        img, label = pad_to(normalize(img), label, self.crop_size, self.ignore_index)
        return img.contiguous(), label.contiguous()


def eval_input(img_chw: torch.Tensor, img_scale: tuple[int, int]) -> torch.Tensor:
    """Test-time input: the ``[0, 1]`` image resized to fit ``img_scale`` (keep ratio) and
    normalised, ``(3, h, w)``."""
    size = rescale_size(img_chw.shape[1], img_chw.shape[2], img_scale)
    img, _ = resize_pair(img_chw * 255.0, None, size)
    return normalize(img)
