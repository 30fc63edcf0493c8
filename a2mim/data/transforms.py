"""Image transforms for pre-training and evaluation (torchvision), plus their inverse.

All transforms take an RGB PIL image (``ImageFolderDataset`` converts grayscale) and return a
normalised float tensor ``img_chw`` of shape ``(3, img_size, img_size)``. Fine-tuning
augmentation (RandAugment, random erasing, ...) comes from timm's ``create_transform``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "eval_transform",
    "pretrain_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


def _check_size(img_size: int) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")


def pretrain_transform(
    img_size: int, scale: tuple[float, float] = (0.67, 1.0), hflip: bool = True
) -> T.Compose:
    """MIM pre-training augmentation: RandomResizedCrop (bicubic) + optional flip.

    Args:
        img_size: output side length in pixels.
        scale: area fraction range of the crop, ``0 < lo <= hi <= 1``. The A2MIM reference
            uses (0.67, 1.0) for ViT and (0.8, 1.0) for ResNet-50.
        hflip: add a random horizontal flip (p = 0.5).

    Returns:
        A callable mapping an RGB PIL image to ``img_chw``, float32 ``(3, img_size, img_size)``
        normalised with the ImageNet mean and std.
    """
    _check_size(img_size)
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
    steps: list[object] = [
        T.RandomResizedCrop(img_size, scale=(lo, hi), interpolation=InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(img_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> T.Compose:
    """Deterministic evaluation transform: resize the short side to
    ``floor(img_size / crop_pct)`` (bicubic), centre-crop ``img_size``, normalise.

    Args:
        img_size: output side length in pixels.
        crop_pct: fraction of the resized image kept by the centre crop, in (0, 1]
            (timm default 0.875: 224 <- 256; RSB A3 tests at 224 with 0.95).

    Returns:
        A callable mapping an RGB PIL image to ``img_chw``, float32 ``(3, img_size, img_size)``.
    """
    _check_size(img_size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    resize = math.floor(img_size / crop_pct)
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def denormalize(
    img_bchw: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` and clamp to [0, 1] for display.

    Args:
        img_bchw: normalised images, ``(B, C, H, W)`` (a single ``(C, H, W)`` image also
            works); ``C == len(mean) == len(std)``.

    Returns:
        Tensor of the same shape and floating dtype with values in [0, 1].
    """
    if img_bchw.ndim not in (3, 4) or img_bchw.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"denormalize expects (B, {len(mean)}, H, W) or ({len(mean)}, H, W) images, got "
            f"shape {tuple(img_bchw.shape)} (mean has {len(mean)}, std {len(std)} entries)"
        )
    if not img_bchw.is_floating_point():
        raise ValueError(f"denormalize expects a floating tensor, got {img_bchw.dtype}")
    mean_c11 = torch.as_tensor(mean, dtype=img_bchw.dtype, device=img_bchw.device)[:, None, None]
    std_c11 = torch.as_tensor(std, dtype=img_bchw.dtype, device=img_bchw.device)[:, None, None]
    return (img_bchw * std_c11 + mean_c11).clamp(0.0, 1.0)
