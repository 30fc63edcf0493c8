"""Stage ``finetune``: end-to-end classification fine-tuning of a pre-trained encoder (timm).

``run(cfg, out_dir) -> metrics``. ``cfg.init`` is the ``encoder.pt`` of a pretrain run (loaded
strictly into every weight except the classifier head); without it the model trains from
scratch (the "scratch" baseline). Everything the recipes need comes from timm: the optimizer
with layer-wise lr decay (``create_optimizer_v2``), RandAugment / random erasing
(``create_transform``), Mixup / CutMix, BCE / soft-target / label-smoothing losses, drop path,
EMA (``ModelEmaV3``) and the warm-up + per-iteration cosine schedule.

The run directory holds ``resolved_config.yaml`` (with a ``derived`` section: scaled lr,
steps, classes, the init report), ``checkpoint.pt`` (latest full state, atomic: model,
optimizer, scheduler, grad scaler, EMA, step), ``model.pt`` (final classifier weights, EMA
weights when kept, and ``meta``), ``metrics.jsonl`` (train lines per logged step, eval lines per
evaluated epoch) and ``metrics.json`` (final: ``top1``, ``top5`` in percent, ``top1_ema``...).
Rank 0 also logs params, metrics and those files to MLflow (``a2mim.tracking``; ``track``,
``tracking_uri``); a resumed run continues its MLflow run (``mlflow_run_id``).
Restarting the same command on the same directory resumes from ``checkpoint.pt``; on the CPU in
deterministic mode the final weights are bit-identical to an uninterrupted run: data order,
augmentation (torch, numpy and Python RNGs), Mixup draws and drop path are all seeded per
``(seed, epoch, index)`` or ``(seed, step)``.

Under torchrun / Submitit each rank trains on every ``world_size``-th sample of the epoch's order.
Mixup / CutMix pair samples within each rank's batch (timm flips the batch) and draw their own
lambda, drop path draws its own pattern per rank, and BatchNorm normalises over each rank's batch:
per-GPU behaviour, as in the reference and timm, so a 2-process run is not the 1-process run with
twice the batch. The logged train loss is the mean over ranks; evaluation shards the validation
set, gives every rank rank 0's BatchNorm statistics first (those ``model.pt`` holds) and sums the
counts, so ``top1`` is over the whole set; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim import atomic, predictions
from a2mim.config import ConfigError, from_dict
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from a2mim.stages.rundir import config_hash, init_tags, open_run, require_init
from a2mim.train import checkpoint, steplog
from a2mim.train.classify import (
    AugmentedDataset,
    AugSampler,
    check_backbone,
    create_classifier,
    evaluate,
    load_encoder,
    rng_scope,
    tracked_derived,
)
from a2mim.train.distributed import (
    broadcast_buffers,
    mean_over_ranks,
    rank_seed,
    resolve_device,
    world_info,
)
from a2mim.train.optim import OptimConfig, build_scheduler, check_timm_optim
from a2mim.train.sampling import mix_seed

__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "FinetuneOptimConfig",
    "LossConfig",
    "MixupConfig",
    "ModelConfig",
    "build_loss",
    "build_model",
    "build_optimizer",
    "load_config",
    "run",
]


@dataclass(frozen=True)
class ModelConfig:
    """The timm classifier. ``backbone_kwargs`` and ``img_size`` must match the pre-training
    run's (``encoder.pt`` meta); ``global_pool: null`` keeps timm's default ("avg" for CNNs,
    "token" for ViTs); the reference ViT fine-tuning uses "avg", which in timm adds ``fc_norm``.
    ``head_init_std`` re-initialises the classifier weight with a truncated normal (MAE uses
    2e-5 for ViT fine-tuning); ``null`` keeps timm's init."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    global_pool: str | None = None
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    head_init_std: float | None = None


@dataclass(frozen=True)
class DataConfig:
    """ImageFolder splits and timm's training transform (``create_transform`` arguments).

    ``repeated_aug`` > 1 repeats each image that many times per epoch with different
    augmentations (RSB A2 / DeiT use 3). Evaluation resizes to ``test_img_size / test_crop_pct``
    (bicubic) and centre-crops ``test_img_size`` (default: ``model.img_size``)."""

    root: str = "data/imagenet"
    split: str = "train"
    val_split: str = "val"
    skip_corrupt: bool = False
    num_workers: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    reprob: float = 0.0
    remode: Literal["const", "rand", "pixel"] = "pixel"
    recount: int = 1
    repeated_aug: int = 1
    test_img_size: int | None = None
    test_crop_pct: float = 0.875
    eval_batch_size: int | None = None


@dataclass(frozen=True)
class MixupConfig:
    """timm ``Mixup``; off when both alphas are 0. ``mode: batch`` needs an even batch."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
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
    smoothing: float = 0.0
    bce_target_thresh: float | None = None


@dataclass(frozen=True)
class FinetuneOptimConfig:
    """A timm optimizer (``opt``: lamb, adamw, sgd, ... any ``timm.optim.list_optimizers()``
    name) built by ``create_optimizer_v2`` (no weight decay on biases, norms and the model's
    ``no_weight_decay()`` set; ``layer_decay`` gives timm's layer-wise lr decay groups).
    ``lr = base_lr * global_batch / lr_batch_divisor``; warm-up then per-iteration cosine."""

    opt: str = "lamb"
    base_lr: float = 1e-3
    lr_batch_divisor: int = 256
    weight_decay: float = 0.02
    betas: tuple[float, float] | None = None
    momentum: float = 0.9
    layer_decay: float | None = None
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    grad_clip: float | None = None


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    scale: Literal["tiny", "small", "paper"] = "paper"
    init: str | None = None  # pretrain encoder.pt / finetune model.pt; null: from scratch
    epochs: int = 100
    batch_size: int = 256  # per process and micro-step
    accum_steps: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    ema_decay: float | None = None
    ema_warmup: bool = False
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every_epochs: int = 1
    ckpt_every_steps: int = 500
    log_every_steps: int = 10
    progress: bool = True
    track: bool = True  # MLflow (a2mim.tracking); rank 0 only
    tracking_uri: str | None = None  # default: sqlite under the results folder, or env
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (not hashed)


def load_config(data: dict[str, Any], where: str = "config") -> FinetuneConfig:
    """Validate a mapping into a ``FinetuneConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(FinetuneConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    check_timm_optim(cfg.optim.opt, cfg.optim.layer_decay, where)
    if cfg.mixup.active and cfg.mixup.mode == "batch" and cfg.batch_size % 2:
        raise ConfigError(f"{where}: Mixup/CutMix in batch mode needs an even batch_size")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ConfigError(f"{where}: ema_decay must be in (0, 1) or null, got {cfg.ema_decay}")
    for name in ("epochs", "batch_size", "accum_steps", "ckpt_every_steps", "log_every_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.data.repeated_aug < 1 or cfg.eval_every_epochs < 1:
        raise ConfigError(f"{where}: data.repeated_aug and eval_every_epochs must be >= 1")
    return cfg


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The timm classifier, its encoder weights loaded strictly from ``cfg.init`` when set
    (the head keeps its init); returns ``(model, init_report)`` (report ``None`` from scratch).
    Random init draws from the global torch generator: seed it first."""
    model = create_classifier(
        cfg.model.backbone,
        num_classes,
        cfg.model.img_size,
        cfg.model.backbone_kwargs,
        global_pool=cfg.model.global_pool,
        drop_path_rate=cfg.model.drop_path_rate,
        drop_rate=cfg.model.drop_rate,
    )
    if cfg.model.head_init_std is not None:
        head = model.get_classifier()
        nn.init.trunc_normal_(head.weight, std=cfg.model.head_init_std)
        nn.init.zeros_(head.bias)
    report = None
    if cfg.init is not None:
        report = load_encoder(
            model, cfg.init, cfg.model.backbone, cfg.model.img_size, cfg.model.backbone_kwargs
        )
    return model, report


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over ``model``'s parameter groups (weight-decay split, and layer-wise
    lr decay groups carrying ``lr_scale`` when ``cfg.layer_decay`` is set; the scheduler
    multiplies each group's lr by its ``lr_scale``)."""
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


def train_transform(cfg: FinetuneConfig):
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


def run(
    cfg: FinetuneConfig, out_dir: str | Path, stop_after_steps: int | None = None
) -> dict[str, float]:
    """Fine-tune (or resume) into ``out_dir``; returns the final metrics.

    ``stop_after_steps`` (tests) returns right after that many optimizer steps, with nothing
    written beyond the periodic checkpoints, as if the process had been killed there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False

    require_init(cfg.init)
    on_corrupt = "skip" if cfg.data.skip_corrupt else "error"
    train_set = ImageFolderDataset(cfg.data.root, cfg.data.split, on_corrupt=on_corrupt)
    test_size = cfg.data.test_img_size or cfg.model.img_size
    val_set = ImageFolderDataset(
        cfg.data.root,
        cfg.data.val_split,
        transform=eval_transform(test_size, cfg.data.test_crop_pct),
        on_corrupt=on_corrupt,
    )
    if val_set.classes != train_set.classes:
        raise ValueError(
            f"{cfg.data.root}: the classes of {cfg.data.split} ({len(train_set.classes)}) and "
            f"{cfg.data.val_split} ({len(val_set.classes)}) differ; both splits need the same "
            f"class folders"
        )
    num_classes = len(train_set.classes)
    global_batch = cfg.batch_size * world * cfg.accum_steps
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.root}/{cfg.data.split} has {len(train_set)} images, fewer than one "
            f"global batch of {global_batch} (batch_size x accum_steps x processes): lower "
            f"batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.optim.base_lr * global_batch / cfg.optim.lr_batch_divisor

    torch.manual_seed(cfg.seed)
    model, init_report = build_model(cfg, num_classes)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, lr)
    sched_cfg = OptimConfig(
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
        schedule="cosine",
    )
    scheduler = build_scheduler(optimizer, sched_cfg, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = (
        ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema_decay else None
    )
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    derived = {
        "global_batch": global_batch,
        "lr": lr,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "world_size": world,
        "num_images": len(train_set),
        "num_val_images": len(val_set),
        "skipped_images": len(train_set.skipped) + len(val_set.skipped),
        "num_classes": num_classes,
        "classes": list(train_set.classes),
        "test_img_size": test_size,
        "num_params": sum(p.numel() for p in model.parameters()),
        "lr_scales": sorted({round(g.get("lr_scale", 1.0), 6) for g in optimizer.param_groups}),
        "init": init_report,
        "config_hash": config_hash(cfg),
    }
    state, tracker = open_run(
        "finetune",
        cfg,
        out,
        derived,
        tags=init_tags(cfg.model.backbone, derived["init"]),
        rank=rank,
        tracked=tracked_derived(derived),
    )
    ckpt_path = out / "checkpoint.pt"
    with tracker:
        if rank == 0:
            tracker.log_artifact(out / "resolved_config.yaml")
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            step = int(state["step"])
            steplog.truncate(out / "metrics.jsonl", step)
        scheduler.step_update(step)

        mixup = None
        if cfg.mixup.active:
            mixup = Mixup(
                mixup_alpha=cfg.mixup.mixup_alpha,
                cutmix_alpha=cfg.mixup.cutmix_alpha,
                prob=cfg.mixup.prob,
                switch_prob=cfg.mixup.switch_prob,
                mode=cfg.mixup.mode,
                label_smoothing=cfg.loss.smoothing,
                num_classes=num_classes,
            )
        loss_fn = build_loss(cfg.loss, mixup is not None)
        seeded = AugmentedDataset(train_set, train_transform(cfg), cfg.seed)
        shard = range(rank, len(val_set), world)
        val_loader = DataLoader(
            Subset(val_set, shard),
            batch_size=cfg.data.eval_batch_size or cfg.batch_size,
            num_workers=cfg.data.num_workers,
        )
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        log = steplog.TrainLog.of_stage(cfg, out, tracker, total_steps, step, rank, "finetune")
        last_eval: dict[str, float] | None = None

        def save(step_done: int) -> None:
            if rank != 0:
                return
            tracker.flush()  # the metrics up to this step reach the store before the checkpoint
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step_done,
                "config_hash": derived["config_hash"],
            }
            if ema is not None:
                ckpt["ema"] = ema.module.state_dict()
            checkpoint.atomic_save(ckpt, ckpt_path)

        def run_eval(step_done: int, epoch_done: int) -> dict[str, float]:
            broadcast_buffers(model)  # every shard is evaluated with the statistics rank 0 saves
            res = evaluate(model, val_loader, device, amp_dtype, collect=True)
            if epoch_done > cfg.epochs - predictions.LAST_EPOCHS:  # for the paired statistics
                where = predictions.path_of(out, predictions.epoch_name(epoch_done))
                meta = {"stage": "finetune", "step": step_done, "epoch": epoch_done}
                predictions.save_classification(where, val_set, shard, res, rank, **meta)
            row = {"top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"]}
            if ema is not None:
                broadcast_buffers(ema.module)
                res_ema = evaluate(ema.module, val_loader, device, amp_dtype)
                row.update(top1_ema=res_ema["top1"], top5_ema=res_ema["top5"])
                row["val_loss_ema"] = res_ema["loss"]
            log.record(step_done, row, epoch=epoch_done)
            return row

        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            epoch_end = (epoch + 1) * steps_per_epoch
            sampler = AugSampler(
                len(train_set),
                cfg.seed,
                epoch,
                repeats=cfg.data.repeated_aug,
                start=pos * cfg.batch_size * cfg.accum_steps,
                rank=rank,
                world_size=world,
                usable=steps_per_epoch * global_batch,
            )
            loader = DataLoader(
                seeded,
                batch_size=cfg.batch_size,
                sampler=sampler,
                num_workers=cfg.data.num_workers,
                drop_last=True,
            )
            batches = iter(loader)
            for step in range(step, epoch_end):  # noqa: B020
                model.train()
                torch.manual_seed(rank_seed(mix_seed(cfg.seed, 1, step), rank))  # drop path
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for micro in range(cfg.accum_steps):
                    img_bchw, target_b = next(batches)
                    img_bchw, target = img_bchw.to(device, non_blocking=True), target_b.to(device)
                    if cfg.channels_last:
                        img_bchw = img_bchw.contiguous(memory_format=torch.channels_last)
                    if mixup is not None:
                        with rng_scope(mix_seed(cfg.seed, 2, step, micro, rank)):
                            img_bchw, target = mixup(img_bchw, target)  # target: (B, K) soft
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                    ):
                        logits_bk = train_model(img_bchw)
                        loss = loss_fn(logits_bk.float(), target)
                    scaler.scale(loss / cfg.accum_steps).backward()
                    loss_sum += loss.detach().double() / cfg.accum_steps
                loss_sum = mean_over_ranks(loss_sum).item()  # the same on every rank
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(
                        f"non-finite loss {loss_sum} at step {step}; lower the lr or disable fp16"
                    )
                if cfg.optim.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if ema is not None:
                    ema.update(model, step=done)
                scheduler.step_update(done)
                row = {
                    "loss": loss_sum,
                    "lr": max(g["lr"] for g in optimizer.param_groups),
                    "epoch": epoch + (done - epoch * steps_per_epoch) / steps_per_epoch,
                }
                log.step(done, global_batch, row)
                # an epoch's last step is saved after its evaluation (below), so a resumed run
                # never skips an evaluation
                if done % cfg.ckpt_every_steps == 0 and done < epoch_end:
                    save(done)
                if stop_after_steps is not None and done >= stop_after_steps:
                    log.close()
                    tracker.close("KILLED")  # interrupted; a restart sets the run RUNNING again
                    return {"stopped_at_step": float(done)}
            step = epoch_end
            if (epoch + 1) % cfg.eval_every_epochs == 0 or step == total_steps:
                last_eval = run_eval(step, epoch + 1)
            if step % cfg.ckpt_every_steps == 0 and step != total_steps:
                save(step)
        log.close()

        if last_eval is None:  # a finished run restarted: evaluate the final weights again
            last_eval = run_eval(total_steps, cfg.epochs)
        save(total_steps)
        metrics = {**last_eval, **({"final_loss": log.last["loss"]} if log.last else {})}
        if rank == 0:  # top1_final, top1_best_last10 (the authors' rule) and their predictions
            metrics |= predictions.finish_classification(
                out, cfg.epochs, last_eval, tracker, total_steps, best_last=True
            )
            meta = {
                "stage": "finetune",
                "backbone": cfg.model.backbone,
                "backbone_kwargs": dict(cfg.model.backbone_kwargs),
                "img_size": cfg.model.img_size,
                "test_img_size": test_size,
                "test_crop_pct": cfg.data.test_crop_pct,
                "global_pool": cfg.model.global_pool,
                "num_classes": num_classes,
                "classes": list(train_set.classes),
                "init": cfg.init,
                "init_sha256": None if init_report is None else init_report["sha256"],
                "config_hash": derived["config_hash"],
                "steps": total_steps,
            }
            saved = {"state_dict": model.state_dict(), "meta": meta}
            if ema is not None:
                saved["state_dict_ema"] = ema.module.state_dict()
            checkpoint.atomic_save(saved, out / "model.pt")
            atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            tracker.log_artifact(out / "metrics.json")
        return metrics
