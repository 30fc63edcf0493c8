"""timm's fine-tuning recipe (as its ``train.py``): the training transform (``create_transform``,
or the device pipeline's crop recipe), Mixup / CutMix and loss settings, the optimizer with
layer-wise lr decay (``create_optimizer_v2``) and the loss it picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

from a2mim.config import EpochWarmupCosine, ImageFolderData, bounded
from a2mim.data.device_pipeline import CropRecipe
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from a2mim.train.optim import fused_kwargs


@dataclass(frozen=True)
class DataConfig(ImageFolderData):
    """ImageFolder splits and timm's training transform (``create_transform`` arguments).

    ``repeated_aug`` > 1 repeats each image that many times per epoch with different
    augmentations (RSB A2 / DeiT use 3). Evaluation resizes to ``test_img_size / test_crop_pct``
    (bicubic) and centre-crops ``test_img_size`` (default: ``model.img_size``)."""

    scale: tuple[float, float] = bounded((0.08, 1.0), gt=0, le=1)  # crop scale
    hflip: float = bounded(0.5, ge=0, le=1)
    color_jitter: float | None = bounded(0.4, ge=0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    reprob: float = bounded(0.0, ge=0, le=1)
    remode: Literal["const", "rand", "pixel"] = "pixel"
    recount: int = bounded(1, ge=1)
    repeated_aug: int = bounded(1, ge=1)
    test_img_size: int | None = bounded(None, ge=1)
    test_crop_pct: float = bounded(0.875, gt=0, le=1)
    eval_batch_size: int | None = bounded(None, ge=1)
    # pil: timm's transform in DataLoader workers (the reference); device: decode, crop, flip and
    # random erasing on the training device (a2mim.data.device_pipeline; no RandAugment there)
    pipeline: Literal["pil", "device"] = "pil"


def device_recipe(cfg: TransformConfig) -> CropRecipe:
    d = cfg.data
    return CropRecipe(
        cfg.model.img_size,
        d.scale,
        interpolation=d.interpolation,
        hflip=d.hflip,
        reprob=d.reprob,
        remode=d.remode,
        recount=d.recount,
    )


def train_transform(cfg: TransformConfig):
    """timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment, random
    erasing), PIL RGB in, normalised ``(3, img_size, img_size)`` tensor out."""
    d = cfg.data
    transform = create_transform(
        cfg.model.img_size,
        is_training=True,
        scale=d.scale,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        auto_augment=d.auto_augment,
        interpolation=d.interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        re_prob=d.reprob,
        re_mode=d.remode,
        re_count=d.recount,
    )
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # timm RandAugment / AutoAugment operations
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op for any Pillow. timm's "PosterizeIncreasing" (RandAugment ``inc1``)
    asks for 0 bits at magnitude 10, which ``rand-m9-mstd0.5`` reaches often; Pillow >= 13
    rejects 0 bits where older Pillow returned an all-black image. Keep that result."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class _Sized(Protocol):
    @property
    def img_size(self) -> int: ...


class TransformConfig(Protocol):
    """What the training transform reads of a ``FinetuneConfig``: ``model.img_size``, ``data``."""

    @property
    def model(self) -> _Sized: ...

    @property
    def data(self) -> DataConfig: ...


@dataclass(frozen=True)
class MixupConfig:
    """timm ``Mixup``; off when both alphas are 0. ``mode: batch`` needs an even batch."""

    mixup_alpha: float = bounded(0.0, ge=0)
    cutmix_alpha: float = bounded(0.0, ge=0)
    prob: float = bounded(1.0, ge=0, le=1)
    switch_prob: float = bounded(0.5, ge=0, le=1)
    mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class LossConfig:
    """``ce``: cross-entropy (label smoothing ``smoothing``; soft targets under Mixup, where the
    smoothing goes into the mixed targets). ``bce``: timm ``BinaryCrossEntropy`` (RSB), with
    an optional ``bce_target_thresh`` that binarises the (mixed) targets."""

    kind: Literal["ce", "bce"] = "ce"
    smoothing: float = bounded(0.0, ge=0, lt=1)
    bce_target_thresh: float | None = bounded(None, ge=0, le=1)


@dataclass(frozen=True)
class FinetuneOptimConfig(EpochWarmupCosine):
    """A timm optimizer (``opt``: lamb, adamw, sgd, ... any ``timm.optim.list_optimizers()``
    name) built by ``create_optimizer_v2`` (no weight decay on biases, norms and the model's
    ``no_weight_decay()`` set; ``layer_decay`` gives timm's layer-wise lr decay groups);
    warm-up then per-iteration cosine."""

    opt: str = "lamb"
    weight_decay: float = bounded(0.02, ge=0)
    betas: tuple[float, float] | None = bounded(None, ge=0, lt=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    warmup_epochs: float = bounded(5.0, ge=0)
    warmup_lr: float = bounded(1e-6, ge=0)
    min_lr: float = bounded(1e-6, ge=0)


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over ``model``'s parameter groups (weight-decay split, and layer-wise
    lr decay groups carrying ``lr_scale`` when ``cfg.layer_decay`` is set; the scheduler
    multiplies each group's lr by its ``lr_scale``); torch's fused kernel where it has one
    (`a2mim.train.optim.FUSED_OPTIMIZERS`)."""
    extra: dict[str, Any] = {}
    if cfg.betas is not None:
        extra["betas"] = cfg.betas
    return create_optimizer_v2(
        model,
        opt=cfg.opt.lower(),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        layer_decay=cfg.layer_decay,
        **extra,
        **fused_kwargs(cfg.opt),
    )


def build_loss(cfg: LossConfig, mixup_active: bool) -> nn.Module:
    """The training loss, as timm's ``train.py`` picks it (targets are class indices without
    Mixup and dense mixed targets with it)."""
    if cfg.kind == "bce":
        smoothing = 0.0 if mixup_active else cfg.smoothing  # Mixup already smoothed the targets
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=cfg.bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()
