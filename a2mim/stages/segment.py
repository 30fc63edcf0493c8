"""Stage ``segment``: ADE20K-style semantic segmentation with UperNet (the paper's ADE20K transfer).

``run(cfg, out_dir) -> metrics``. The network is `a2mim.models.upernet.UperNetSegmenter`: a timm
encoder loaded strictly from ``cfg.init`` (a pretrain ``encoder.pt``; without one it trains from
scratch), BEiT's simple pyramid for plain ViTs, transformers' UperNet head (PPM 1, 2, 3, 6) and
an auxiliary FCN head (loss weight 0.4), as mmsegmentation's ``upernet_*_512x512_160k_ade20k``.

Protocol (paper A.3, "following MAE", in MMSegmentation): iteration-based training (160k
iterations at batch 16), mmseg's ADE20K pipeline (`a2mim.data.seg_transforms`: random rescale of
(2048, 512) by 0.5-2.0, 512 crop with ``cat_max_ratio`` 0.75, flip, photometric distortion),
pixel cross-entropy with ignore index 255 (mmseg's mean over all pixels by default,
``loss.avg_non_ignore`` for the mean over labelled ones), a timm optimizer (AdamW) with layer-wise
lr decay for ViTs (mmseg ``LayerDecayOptimizerConstructor``: embeddings ``d^(L+1)``, block i
``d^(L-i)``, neck and heads 1), linear warm-up then a per-iteration poly schedule (MMEngine's
``LinearLR`` + ``PolyLR``; timm ``PolyLRScheduler``). Evaluation runs at the end (and every
``eval.every_steps``): each image is resized to fit ``img_scale`` (keep ratio), predicted whole or
by sliding ``crop_size`` windows, and the logits are resized back to the label's size. ``miou``
is torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index)`` (mmseg's mIoU: classes
absent from both prediction and label are left out), ``aacc`` / ``macc`` mmseg's overall and
mean class accuracy (classes without labelled pixels left out), all in percent.

Outputs: ``resolved_config.yaml`` (with ``derived``), ``checkpoint.pt`` (model, optimizer,
scheduler, grad scaler, step; atomic, every ``ckpt_every_steps``), ``model.pt`` (final weights +
``meta``), ``metrics.jsonl`` (train lines per logged step, eval lines), ``per_class_iou.json``
and, last, ``metrics.json`` (``miou``, ``aacc``, ``macc``, ``final_loss``); rank 0 logs params,
metrics and files to MLflow. Restarting the same command resumes from ``checkpoint.pt``; on the
CPU in deterministic mode the final weights are bit-identical to an uninterrupted run: the
sample order is a function of ``(seed, epoch)``, each sample's augmentation of ``(seed, epoch,
index)`` and dropout / drop path of ``(seed, step, rank)``.

Under torchrun / Submitit rank ``r`` takes rows ``r, r + world, ...`` of each global batch,
BatchNorm is synchronised over ranks on CUDA (mmseg's SyncBN; ``sync_bn``), the logged loss is
the mean over ranks and evaluation shards the validation images (torchmetrics sums the counts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from a2mim import atomic, predictions
from a2mim.config import ConfigError, OptimBase, TransferRunConfig, bounded, from_dict
from a2mim.data.ade import ADE20KSegmentation, validate_root
from a2mim.data.seg_transforms import SegTrainTransform, eval_input
from a2mim.models.upernet import (
    UperNetSegmenter,
    build_upernet,
    load_init,
    param_groups,
    slide_logits,
    whole_logits,
)
from a2mim.train import checkpoint, engine
from a2mim.train.classify import tracked_derived
from a2mim.train.distributed import broadcast_buffers
from a2mim.train.encoder import check_backbone
from a2mim.train.optim import check_timm_optim
from a2mim.train.rundir import init_tags, require_init
from a2mim.train.sampling import mix_seed

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "SegMetrics",
    "SegmentConfig",
    "SegmentOptimConfig",
    "StreamSampler",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "load_config",
    "run",
    "seg_loss",
]


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and heads. ``backbone_kwargs`` must match the pre-training run's (``encoder.pt``
    meta). ``out_indices``: the four ``feature_info`` indices the heads read (null: the last
    four stages of a hierarchical encoder, four evenly spaced blocks of a plain ViT; MAE / BEiT
    use blocks 3, 5, 7, 11 of ViT-B). ``channels``: UperNet width (mmseg: 512 for ResNet-50,
    768 for the MAE / BEiT ViT-B). ``aux_weight: 0`` drops the auxiliary FCN head."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    out_indices: tuple[int, ...] | None = bounded(None, ge=0)
    channels: int = bounded(512, ge=1)
    pool_scales: tuple[int, ...] = bounded((1, 2, 3, 6), ge=1)
    aux_channels: int = bounded(256, ge=1)
    aux_in_index: int = bounded(2, ge=0, le=3)
    aux_weight: float = bounded(0.4, ge=0)
    dropout: float = bounded(0.1, ge=0, lt=1)
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)


@dataclass(frozen=True)
class DataConfig:
    """An ADE20K-layout folder (`a2mim.data.ade`) and mmseg's pipeline (`a2mim.data.seg_transforms`;
    ``img_scale`` is ``(long, short)``, also the test size). The label convention is explicit
    and checked against a sample of the label files before training (`a2mim.data.ade.validate_root`):
    ``reduce_zero_label: true`` (ADE20K; the toy scenes too, with ``num_classes: 11``): raw 0 is
    ignored and 1..K are the classes; ``false``: raw 0..K-1 are the classes and ``ignore_index``
    is void. ``num_classes`` is K."""

    root: str = "data/ade20k/ADEChallengeData2016"
    split: str = "training"
    val_split: str = "validation"
    num_classes: int = bounded(150, ge=1, le=254)
    reduce_zero_label: bool = True
    ignore_index: int = bounded(255, ge=1, le=255)
    img_scale: tuple[int, int] = bounded((2048, 512), ge=1)
    ratio_range: tuple[float, float] = bounded((0.5, 2.0), gt=0)
    crop_size: int = bounded(512, ge=1)
    cat_max_ratio: float = bounded(0.75, gt=0, le=1)
    hflip: float = bounded(0.5, ge=0, le=1)
    photometric: bool = True
    num_workers: int = bounded(4, ge=0)


@dataclass(frozen=True)
class EvalConfig:
    """Test-time inference: ``whole`` (one pass; mmseg's ResNet UperNet) or ``slide``
    (``crop_size`` windows every ``stride`` pixels; mmseg's ViT UperNet, stride 341).
    ``every_steps``: also evaluate during training (null: only at the end)."""

    mode: Literal["whole", "slide"] = "whole"
    stride: int = bounded(341, ge=1)
    every_steps: int | None = bounded(None, ge=1)


@dataclass(frozen=True)
class LossConfig:
    """Pixel cross-entropy ignoring ``data.ignore_index``. mmseg's default
    (``avg_non_ignore: false``) divides by all pixels of the batch, ignored ones included;
    ``true`` divides by the labelled pixels only."""

    avg_non_ignore: bool = False


@dataclass(frozen=True)
class SegmentOptimConfig(OptimBase):
    """A timm optimizer (``create_optimizer_v2``) over `a2mim.models.upernet.param_groups`;
    ``lr = base_lr * global_batch / lr_batch_divisor`` (the divisor 16 keeps mmseg's absolute
    lr at batch 16). Warm-up: ``warmup_iters`` linear from ``lr * warmup_ratio``; then poly
    ``(lr - min_lr) * (1 - t / T) ** power + min_lr`` over the remaining iterations."""

    opt: str = "adamw"
    base_lr: float = bounded(1e-4, gt=0)
    lr_batch_divisor: int = bounded(16, ge=1)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] | None = bounded((0.9, 0.999), ge=0, lt=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    layer_decay: float | None = bounded(None, gt=0, le=1)
    warmup_iters: int = bounded(1500, ge=0)
    warmup_ratio: float = bounded(1e-6, ge=0, le=1)
    power: float = bounded(1.0, gt=0)
    min_lr: float = bounded(0.0, ge=0)


@dataclass(frozen=True)
class SegmentConfig(TransferRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: SegmentOptimConfig = field(default_factory=SegmentOptimConfig)
    iters: int = bounded(160_000, ge=0)  # 0: the untrained network evaluated (a baseline)
    batch_size: int = bounded(16, ge=1)  # per process and micro-step
    sync_bn: bool = True  # SyncBatchNorm across ranks (CUDA, world_size > 1), as mmseg
    ckpt_every_steps: int = bounded(2000, ge=1)
    log_every_steps: int = bounded(50, ge=1)


def load_config(data: dict[str, Any], where: str = "config") -> SegmentConfig:
    """Validate a mapping into a ``SegmentConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(SegmentConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    check_timm_optim(cfg.optim.opt, cfg.optim.layer_decay, where)
    if cfg.batch_size < 2:
        raise ConfigError(
            f"{where}: batch_size must be >= 2 (BatchNorm in the heads, and the 1x1 pyramid "
            f"pooling level, need more than one value per channel), got {cfg.batch_size}"
        )
    if cfg.iters and not 0 <= cfg.optim.warmup_iters < cfg.iters:
        raise ConfigError(
            f"{where}: optim.warmup_iters must be in [0, iters={cfg.iters}), got "
            f"{cfg.optim.warmup_iters}"
        )
    d = cfg.data
    if not 1 <= d.num_classes < d.ignore_index <= 255:
        raise ConfigError(
            f"{where}: need 1 <= data.num_classes < data.ignore_index <= 255, got "
            f"{d.num_classes} and {d.ignore_index}"
        )
    if d.crop_size < 1 or min(d.img_scale) < 1:
        raise ConfigError(f"{where}: data.crop_size and data.img_scale must be positive")
    if not 0 < d.ratio_range[0] <= d.ratio_range[1]:
        raise ConfigError(f"{where}: data.ratio_range must satisfy 0 < lo <= hi")
    if cfg.eval.mode == "slide" and not 1 <= cfg.eval.stride <= d.crop_size:
        raise ConfigError(
            f"{where}: eval.stride must be in [1, data.crop_size={d.crop_size}], got "
            f"{cfg.eval.stride}"
        )
    if cfg.eval.every_steps is not None and cfg.eval.every_steps < 1:
        raise ConfigError(f"{where}: eval.every_steps must be >= 1 or null")
    m = cfg.model
    if m.out_indices is not None and len(m.out_indices) != 4:
        raise ConfigError(f"{where}: model.out_indices needs 4 indices, got {m.out_indices}")
    if m.aux_weight < 0 or not 0 <= m.aux_in_index < 4:
        raise ConfigError(f"{where}: model.aux_weight must be >= 0 and aux_in_index in 0..3")
    return cfg


# ------------------------------------------------------------------------------- model, optim


def build_model(cfg: SegmentConfig) -> tuple[UperNetSegmenter, dict | None]:
    """The segmenter, its encoder loaded strictly from ``cfg.init`` when set; returns
    ``(model, init_report)``. Random init draws from the global torch generator: seed it first."""
    m = cfg.model
    model = build_upernet(
        m.backbone,
        cfg.data.num_classes,
        cfg.data.crop_size,
        m.backbone_kwargs,
        drop_path_rate=m.drop_path_rate,
        out_indices=None if m.out_indices is None else list(m.out_indices),
        channels=m.channels,
        pool_scales=m.pool_scales,
        aux_channels=m.aux_channels if m.aux_weight > 0 else None,
        aux_in_index=m.aux_in_index,
        dropout=m.dropout,
    )
    report = None
    if cfg.init is not None:
        report = load_init(model, cfg.init, m.backbone, m.backbone_kwargs, cfg.data.crop_size)
    return model, report


def build_optimizer(
    model: UperNetSegmenter, cfg: SegmentOptimConfig, lr: float
) -> torch.optim.Optimizer:
    """timm's optimizer over the weight-decay / layer-decay groups of `param_groups`."""
    extra: dict[str, Any] = {}
    if cfg.betas is not None and cfg.opt.lower() not in ("sgd", "momentum", "nesterov"):
        extra["betas"] = cfg.betas
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return create_optimizer_v2(
        groups,
        opt=cfg.opt.lower(),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        **extra,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SegmentOptimConfig, total_steps: int, lr: float
) -> PolyLRScheduler:
    """Linear warm-up from ``lr * warmup_ratio`` over ``warmup_iters``, then poly decay to
    ``min_lr`` at ``total_steps`` (stepped per iteration with ``step_update``; honours each
    group's ``lr_scale``)."""
    return PolyLRScheduler(
        optimizer,
        t_initial=max(total_steps - cfg.warmup_iters, 1),  # iters 0: never stepped
        power=cfg.power,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_iters,
        warmup_lr_init=lr * cfg.warmup_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def seg_loss(
    logits_bkhw: torch.Tensor, label_bhw: torch.Tensor, ignore_index: int, avg_non_ignore: bool
) -> torch.Tensor:
    """Cross-entropy of logits resized (bilinear) to the label's size, in float32; the mean over
    all pixels (mmseg default, ignored pixels count as 0) or over labelled pixels only."""
    logits = F.interpolate(
        logits_bkhw.float(), size=label_bhw.shape[-2:], mode="bilinear", align_corners=False
    )
    loss_bhw = F.cross_entropy(logits, label_bhw, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss_bhw.sum() / (label_bhw != ignore_index).sum().clamp(min=1)
    return loss_bhw.mean()


# ------------------------------------------------------------------------------------- data


class StreamSampler(Sampler[tuple[int, int]]):
    """Keys ``(epoch, index)`` of the training stream, for steps ``[start, stop)``.

    The stream visits the images in a permutation drawn from ``(seed, epoch)``, epoch after
    epoch, without a gap at epoch ends (mmseg's infinite sampler); step ``s`` takes stream
    positions ``s * global_batch .. + global_batch`` and rank ``r`` its rows ``r, r + world, ...``.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        batch_size: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_samples, generator=gen).tolist())
        return self._perm[1]

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start, self.stop):
            for row in range(self.batch_size):
                position = step * global_batch + row * self.world_size + self.rank
                epoch, pos = divmod(position, self.num_samples)
                yield epoch, self._order(epoch)[pos]

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size


class AugmentedSegSet(Dataset):
    """Key ``(epoch, index)`` -> the training transform of item ``index`` with a numpy
    generator seeded from ``(seed, epoch, index)``."""

    def __init__(self, dataset: ADE20KSegmentation, transform: SegTrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        img_chw, label_hw = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.transform(img_chw, label_hw, rng)


@dataclass(frozen=True)
class _TestInput:
    """Dataset transform for evaluation: the test-size, normalised image and the label as is."""

    img_scale: tuple[int, int]

    def __call__(self, img_chw: torch.Tensor, label_hw: torch.Tensor):
        return eval_input(img_chw, self.img_scale), label_hw


# ------------------------------------------------------------------------------ evaluation


class SegMetrics:
    """mmseg's segmentation metrics over many images, ignoring ``ignore_index`` pixels.

    ``miou``: torchmetrics ``MulticlassJaccardIndex(average="macro")``, the mean IoU over the
    classes present in the labels or the predictions (a class absent from both is left out, as
    mmseg's ``nanmean``). ``aacc``: correct / labelled pixels. ``macc``: mean per-class recall
    over the classes with labelled pixels. Percent. Counts are summed over ranks on ``compute``.
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        self.jaccard = MulticlassJaccardIndex(
            num_classes, average="macro", ignore_index=ignore_index
        ).to(device)
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index).to(device)

    def update(self, pred_bhw: torch.Tensor, label_bhw: torch.Tensor) -> None:
        self.jaccard.update(pred_bhw, label_bhw)
        self.confmat.update(pred_bhw, label_bhw)

    def compute(self) -> dict[str, Any]:
        """``{"miou", "aacc", "macc", "iou_per_class"}`` (per-class IoU NaN where a class is in
        neither labels nor predictions)."""
        cm = self.confmat.compute().double().cpu()  # rows: label, columns: prediction
        hits, labelled, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        union = labelled + predicted - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
        recall = torch.where(labelled > 0, hits / labelled.clamp(min=1), torch.nan)
        return {
            "miou": 100.0 * float(self.jaccard.compute()),
            "aacc": 100.0 * float(hits.sum() / cm.sum().clamp(min=1)),
            "macc": 100.0 * float(recall.nanmean()),
            "iou_per_class": [100.0 * float(v) for v in iou],
        }


@torch.no_grad()
def evaluate(
    model: UperNetSegmenter,
    loader: DataLoader,
    cfg: SegmentConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    per_image: list | None = None,
) -> dict[str, Any]:
    """`SegMetrics` of ``model`` over ``loader`` (items: test-size normalised image, label at
    its original size; batch size 1 since sizes differ): logits whole or slid, resized to the
    label, arg-max. ``per_image`` (when given) receives each image's per-class intersection
    and union counts, in the loader's order (:func:`a2mim.predictions.segmentation_counts`)."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(cfg.data.num_classes, cfg.data.ignore_index, device)
    for img_bchw, label_bhw in loader:
        img_bchw, label_bhw = img_bchw.to(device), label_bhw.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if cfg.eval.mode == "slide":
                logits = slide_logits(model, img_bchw, cfg.data.crop_size, cfg.eval.stride)
            else:
                logits = whole_logits(model, img_bchw)
        logits = F.interpolate(
            logits.float(), size=label_bhw.shape[-2:], mode="bilinear", align_corners=False
        )
        metrics.update(logits.argmax(1), label_bhw)
        if per_image is not None:
            for pred_hw, label_hw in zip(logits.argmax(1).cpu(), label_bhw.cpu(), strict=True):
                counts = predictions.segmentation_counts(
                    pred_hw.numpy(), label_hw.numpy(), cfg.data.num_classes, cfg.data.ignore_index
                )
                per_image.append(counts)
    model.train(was_training)
    return metrics.compute()


# ------------------------------------------------------------------------------------- run


class SegmentTask(engine.Task):
    """UperNet on a stream of augmented crops (no epochs); the decode + auxiliary loss; mIoU
    every ``eval.every_steps`` and at the end."""

    stage = "segment"

    def prepare(self, accum_steps: int) -> engine.Steps:
        cfg, d, ctx = self.cfg, self.cfg.data, self.ctx
        require_init(cfg.init)
        self.label_scan = validate_root(
            d.root, d.num_classes, d.reduce_zero_label, d.ignore_index, (d.split, d.val_split)
        )
        ade = {
            "reduce_zero_label": d.reduce_zero_label,
            "num_classes": d.num_classes,
            "ignore_index": d.ignore_index,
        }
        self.train_set = ADE20KSegmentation(d.root, d.split, **ade)
        self.val_set = ADE20KSegmentation(
            d.root, d.val_split, transforms=_TestInput(d.img_scale), **ade
        )
        self.val_loader = DataLoader(
            Subset(self.val_set, range(ctx.rank, len(self.val_set), ctx.world)),
            batch_size=1,
            num_workers=d.num_workers,
        )
        transform = SegTrainTransform(
            img_scale=d.img_scale,
            ratio_range=d.ratio_range,
            crop_size=d.crop_size,
            cat_max_ratio=d.cat_max_ratio,
            hflip=d.hflip,
            photometric=d.photometric,
            ignore_index=d.ignore_index,
        )
        self.augmented = AugmentedSegSet(self.train_set, transform, cfg.seed)
        global_batch = cfg.batch_size * ctx.world * accum_steps
        return engine.Steps(cfg.iters, global_batch, accum_steps, None)

    def build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.lr = cfg.optim.scaled_lr(self.steps.global_batch)
        model, self.init_report = build_model(cfg)
        if ctx.world > 1 and cfg.sync_bn and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps.total, self.lr)

    def derived(self) -> dict[str, Any]:
        model, steps = self.model, self.steps
        groups = self.optimizer.param_groups
        return {
            "epochs": steps.total * steps.global_batch / len(self.train_set),
            "num_images": len(self.train_set),
            "num_val_images": len(self.val_set),
            "num_classes": self.cfg.data.num_classes,
            "labels": {"reduce_zero_label": self.cfg.data.reduce_zero_label, **self.label_scan},
            "out_indices": list(model.out_indices),
            "in_channels": list(model.in_channels),
            "strides": list(model.strides),
            "simple_pyramid": model.plain,
            "num_params": sum(p.numel() for p in model.parameters()),
            "lr_scales": sorted({round(g.get("lr_scale", 1.0), 6) for g in groups}),
            "init": self.init_report,
        }

    def tags(self) -> dict[str, str]:
        return init_tags(self.cfg.model.backbone, self.init_report)

    def tracked(self, derived: dict[str, Any]) -> dict[str, Any]:
        return tracked_derived(derived)

    def batches(self, step: int):
        cfg, ctx, steps = self.cfg, self.ctx, self.steps
        accum = steps.accum_steps
        loader = DataLoader(
            self.augmented,
            batch_size=cfg.batch_size,
            sampler=StreamSampler(
                len(self.train_set),
                cfg.seed,
                cfg.batch_size,
                step * accum,  # the stream counts micro-steps
                steps.total * accum,
                ctx.rank,
                ctx.world,
            ),
            num_workers=cfg.data.num_workers,
            drop_last=True,
        )
        return iter(loader)

    def loss(self, train_model, batch, step, micro):
        device, d = self.ctx.device, self.cfg.data
        img_bchw, label_bhw = batch
        img_bchw, label_bhw = img_bchw.to(device, non_blocking=True), label_bhw.to(device)
        with self.ctx.autocast():
            logits, aux_logits = train_model(img_bchw)
        avg = self.cfg.loss.avg_non_ignore
        loss_decode = seg_loss(logits, label_bhw, d.ignore_index, avg)
        loss_aux = torch.zeros_like(loss_decode)
        if aux_logits is not None:
            loss_aux = seg_loss(aux_logits, label_bhw, d.ignore_index, avg)
        loss = loss_decode + self.cfg.model.aux_weight * loss_aux
        return loss, {"loss": loss, "loss_decode": loss_decode, "loss_aux": loss_aux}

    def progress(self, done: int) -> dict[str, float]:
        return {}

    def eval_due(self, done: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every) and done % every == 0

    def evaluate(self, done: int) -> dict[str, float]:
        broadcast_buffers(self.model)  # every shard is evaluated with the statistics rank 0 saves
        loader = engine.interruptible(self.val_loader)
        ctx, per_image = self.ctx, [] if done == self.steps.end else None
        self.result = evaluate(self.model, loader, self.cfg, ctx.device, ctx.amp_dtype, per_image)
        if per_image is not None:  # the final evaluation, for the paired statistics
            ids = [Path(image).stem for image, _ in self.val_set.samples]
            shard = range(ctx.rank, len(self.val_set), ctx.world)
            counts = [(i, *c) for i, c in zip(shard, per_image, strict=True)]
            meta = {"stage": "segment", "step": done}
            predictions.save_segmentation(
                predictions.path_of(ctx.out), ids, counts, ctx.rank, **meta
            )
        return {k: self.result[k] for k in ("miou", "aacc", "macc")}

    def write_final(self, metrics: dict[str, Any]) -> list:
        out = self.ctx.out
        derived = {"config_hash": self.config_hash, "total_steps": self.steps.total}
        _write_outputs(out, self.cfg, self.model, derived, self.init_report, self.result)
        return [(out / "per_class_iou.json", None), (predictions.path_of(out), predictions.FOLDER)]


def _write_outputs(
    out: Path,
    cfg: SegmentConfig,
    model: UperNetSegmenter,
    derived: dict[str, Any],
    init_report: dict | None,
    result: dict[str, Any],
) -> None:
    """``model.pt`` (weights + what rebuilds the network) and ``per_class_iou.json``."""
    meta = {
        "stage": "segment",
        "backbone": cfg.model.backbone,
        "backbone_kwargs": dict(cfg.model.backbone_kwargs),
        "crop_size": cfg.data.crop_size,
        "num_classes": cfg.data.num_classes,
        "out_indices": list(model.out_indices),
        "init": cfg.init,
        "init_sha256": None if init_report is None else init_report["sha256"],
        "config_hash": derived["config_hash"],
        "steps": derived["total_steps"],
    }
    checkpoint.atomic_save({"state_dict": model.state_dict(), "meta": meta}, out / "model.pt")
    per_class = {
        str(k): (None if math.isnan(v) else v) for k, v in enumerate(result["iou_per_class"])
    }
    atomic.write_text(out / "per_class_iou.json", json.dumps(per_class, indent=2))


run = engine.stage_runner(SegmentTask)
