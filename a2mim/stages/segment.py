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
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim import atomic, predictions
from a2mim.config import ConfigError, TransferRunConfig, bounded, from_dict
from a2mim.data.ade import ADE20KSegmentation, validate_root
from a2mim.data.seg_transforms import SegTrainTransform
from a2mim.models.upernet import UperNetSegmenter, build_upernet, load_init
from a2mim.segmentation.data import AugmentedSegSet, DataConfig, StreamSampler, TestInput
from a2mim.segmentation.evaluate import EvalConfig, SegMetrics, evaluate
from a2mim.segmentation.loss import LossConfig, seg_loss
from a2mim.segmentation.solver import SegmentOptimConfig, build_optimizer, build_scheduler
from a2mim.train import checkpoint, engine
from a2mim.train.classify import tracked_derived
from a2mim.train.distributed import broadcast_buffers
from a2mim.train.encoder import check_backbone
from a2mim.train.optim import check_timm_optim
from a2mim.train.rundir import init_tags, require_init

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
class SegmentConfig(TransferRunConfig):
    """A segment YAML: the ``model`` (encoder and UperNet head), ``data``, ``eval``, ``loss``
    and ``optim`` sections, the iteration count (``iters``) and the run-control keys of
    :class:`~a2mim.config.TransferRunConfig`, with mmseg's defaults."""

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
            d.root, d.val_split, transforms=TestInput(d.img_scale), **ade
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
