"""Stage ``linprobe``: linear classification on frozen features (MoCo protocol).

``run(cfg, out_dir) -> metrics``. The backbone (timm, ``num_classes=0``: its pooled features) is
loaded strictly from ``cfg.init`` (a pretrain ``encoder.pt``; without one it stays at its random
init, the "random features" baseline), frozen (no grad) and kept in eval mode, so its
BatchNorm statistics never change. Only ``BatchNorm1d(affine=False)`` + ``Linear`` on the pooled
features train, with SGD (momentum 0.9, no weight decay by default), ``lr = base_lr *
global_batch / 256`` (MoCo: 30 for ResNet-50, 12 for ViT) and a per-iteration cosine schedule.
Training augmentation is RandomResizedCrop + flip; evaluation is resize + centre crop.

Outputs as in ``finetune``: ``resolved_config.yaml`` (with ``derived``), ``checkpoint.pt``
(head, optimizer, scheduler, scaler, step; atomic), ``model.pt`` (backbone + head weights and
``meta``, loadable with ``a2mim.train.classify.load_classifier``), ``metrics.jsonl`` and
``metrics.json`` (``top1``, ``top5`` in percent), logged to MLflow by rank 0 as in ``finetune``.
Restarting resumes exactly.

Under torchrun / Submitit each rank takes every ``world_size``-th sample and the feature
BatchNorm normalises over each rank's batch (per GPU, as MoCo / MAE); the logged loss is the mean
over ranks, and evaluation gives every rank rank 0's BatchNorm statistics and sums the counts of
the shards, so ``top1`` is that of ``model.pt`` on the whole validation set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim import atomic, predictions
from a2mim.config import ConfigError, from_dict
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform, pretrain_transform
from a2mim.stages.rundir import config_hash, init_tags, open_run, require_init
from a2mim.train import checkpoint, steplog
from a2mim.train.classify import (
    AugmentedDataset,
    AugSampler,
    LinearProbe,
    check_backbone,
    create_classifier,
    evaluate,
    load_encoder,
    tracked_derived,
)
from a2mim.train.distributed import (
    broadcast_buffers,
    mean_over_ranks,
    rank_seed,
    resolve_device,
    world_info,
)
from a2mim.train.optim import OptimConfig, build_scheduler
from a2mim.train.sampling import mix_seed

__all__ = [
    "DataConfig",
    "LinprobeConfig",
    "ModelConfig",
    "ProbeOptimConfig",
    "build_probe",
    "load_config",
    "run",
]


@dataclass(frozen=True)
class ModelConfig:
    """The frozen backbone and the probe. ``backbone_kwargs`` and ``img_size`` must match the
    pre-training run's; ``global_pool: null`` keeps timm's default pooling ("avg" for CNNs, the
    cls token after the final norm for ViTs, as MoCo v3 / MAE probe). ``feature_bn`` puts
    ``BatchNorm1d(affine=False)`` before the linear layer (MAE); the linear weight is drawn
    from N(0, ``head_init_std``^2), its bias 0."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    global_pool: str | None = None
    feature_bn: bool = True
    head_init_std: float = 0.01


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/imagenet"
    split: str = "train"
    val_split: str = "val"
    skip_corrupt: bool = False
    num_workers: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    test_crop_pct: float = 0.875
    eval_batch_size: int | None = None


@dataclass(frozen=True)
class ProbeOptimConfig:
    """SGD on the probe: ``lr = base_lr * global_batch / lr_batch_divisor``, optional linear
    warm-up, then per-iteration cosine to ``min_lr``."""

    base_lr: float = 30.0
    lr_batch_divisor: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0


@dataclass(frozen=True)
class LinprobeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    scale: Literal["tiny", "small", "paper"] = "paper"
    init: str | None = None  # pretrain encoder.pt / finetune model.pt; null: random features
    epochs: int = 100
    batch_size: int = 256  # per process
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
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


def load_config(data: dict[str, Any], where: str = "config") -> LinprobeConfig:
    """Validate a mapping into a ``LinprobeConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(LinprobeConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    for name in ("epochs", "batch_size", "ckpt_every_steps", "log_every_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every_epochs < 1:
        raise ConfigError(f"{where}: eval_every_epochs must be >= 1")
    return cfg


def build_probe(cfg: LinprobeConfig, num_classes: int) -> tuple[LinearProbe, dict | None]:
    """The frozen backbone (loaded strictly from ``cfg.init`` when set) and a fresh probe;
    returns ``(probe, init_report)``."""
    backbone = create_classifier(
        cfg.model.backbone,
        0,
        cfg.model.img_size,
        cfg.model.backbone_kwargs,
        global_pool=cfg.model.global_pool,
    )
    report = None
    if cfg.init is not None:
        report = load_encoder(
            backbone,
            cfg.init,
            cfg.model.backbone,
            cfg.model.img_size,
            cfg.model.backbone_kwargs,
            allow_new_head=False,
        )
    probe = LinearProbe(backbone, num_classes, cfg.model.feature_bn, cfg.model.head_init_std)
    return probe, report


def run(
    cfg: LinprobeConfig, out_dir: str | Path, stop_after_steps: int | None = None
) -> dict[str, float]:
    """Train (or resume) the linear probe into ``out_dir``; returns the final metrics.

    ``stop_after_steps`` (tests) returns right after that many steps, as if killed there.
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
    val_set = ImageFolderDataset(
        cfg.data.root,
        cfg.data.val_split,
        transform=eval_transform(cfg.model.img_size, cfg.data.test_crop_pct),
        on_corrupt=on_corrupt,
    )
    if val_set.classes != train_set.classes:
        raise ValueError(
            f"{cfg.data.root}: the classes of {cfg.data.split} and {cfg.data.val_split} "
            f"differ; both splits need the same class folders"
        )
    num_classes = len(train_set.classes)
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.root}/{cfg.data.split} has {len(train_set)} images, fewer than one "
            f"global batch of {global_batch} (batch_size x processes): lower batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.optim.base_lr * global_batch / cfg.optim.lr_batch_divisor

    torch.manual_seed(cfg.seed)
    probe, init_report = build_probe(cfg, num_classes)
    probe.to(device)
    if cfg.channels_last:
        probe.backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        probe.head.parameters(),
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
    )
    sched_cfg = OptimConfig(
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_lr=cfg.optim.warmup_lr,
        min_lr=cfg.optim.min_lr,
        schedule="cosine",
    )
    scheduler = build_scheduler(optimizer, sched_cfg, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    train_head: nn.Module = probe.head
    if world > 1:
        train_head = nn.parallel.DistributedDataParallel(
            probe.head, device_ids=[device.index] if device.type == "cuda" else None
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
        "feature_dim": probe.head[1].in_features,
        "init": init_report,
        "config_hash": config_hash(cfg),
    }
    state, tracker = open_run(
        "linprobe",
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
            probe.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
            steplog.truncate(out / "metrics.jsonl", step)
        scheduler.step_update(step)

        seeded = AugmentedDataset(
            train_set,
            pretrain_transform(cfg.model.img_size, cfg.data.crop_scale, cfg.data.hflip),
            cfg.seed,
        )
        shard = range(rank, len(val_set), world)
        val_loader = DataLoader(
            Subset(val_set, shard),
            batch_size=cfg.data.eval_batch_size or cfg.batch_size,
            num_workers=cfg.data.num_workers,
        )
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        log = steplog.TrainLog.of_stage(cfg, out, tracker, total_steps, step, rank, "linprobe")
        loss_fn = nn.CrossEntropyLoss()
        last_eval: dict[str, float] | None = None

        def save(step_done: int) -> None:
            if rank != 0:
                return
            tracker.flush()  # the metrics up to this step reach the store before the checkpoint
            checkpoint.atomic_save(
                {
                    "head": probe.head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step_done,
                    "config_hash": derived["config_hash"],
                },
                ckpt_path,
            )

        def run_eval(step_done: int, epoch_done: int) -> dict[str, float]:
            broadcast_buffers(probe.head)  # rank 0's feature-BN statistics, the ones it saves
            res = evaluate(probe, val_loader, device, amp_dtype, collect=True)
            if epoch_done == cfg.epochs:  # the final evaluation, for the paired statistics
                where = predictions.path_of(out, predictions.epoch_name(epoch_done))
                meta = {"stage": "linprobe", "step": step_done, "epoch": epoch_done}
                predictions.save_classification(where, val_set, shard, res, rank, **meta)
            row = {"top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"]}
            log.record(step_done, row, epoch=epoch_done)
            return row

        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            epoch_end = (epoch + 1) * steps_per_epoch
            sampler = AugSampler(
                len(train_set),
                cfg.seed,
                epoch,
                start=pos * cfg.batch_size,
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
                probe.train()  # the head only: the backbone stays in eval mode
                torch.manual_seed(rank_seed(mix_seed(cfg.seed, 1, step), rank))
                img_bchw, target_b = next(batches)
                img_bchw, target_b = img_bchw.to(device, non_blocking=True), target_b.to(device)
                if cfg.channels_last:
                    img_bchw = img_bchw.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    feat_bd = probe.features(img_bchw)
                logits_bk = train_head(feat_bd.float())
                loss = loss_fn(logits_bk, target_b)
                scaler.scale(loss).backward()
                loss_val = mean_over_ranks(loss.detach().double()).item()  # same on every rank
                if not math.isfinite(loss_val):
                    raise FloatingPointError(
                        f"non-finite loss {loss_val} at step {step}; lower optim.base_lr"
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                scheduler.step_update(done)
                row = {
                    "loss": loss_val,
                    "lr": optimizer.param_groups[0]["lr"],
                    "epoch": epoch + (done - epoch * steps_per_epoch) / steps_per_epoch,
                }
                log.step(done, global_batch, row)
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
        if rank == 0:  # top1_final and the final evaluation's predictions
            metrics |= predictions.finish_classification(
                out, cfg.epochs, last_eval, tracker, total_steps
            )
            meta = {
                "stage": "linprobe",
                "backbone": cfg.model.backbone,
                "backbone_kwargs": dict(cfg.model.backbone_kwargs),
                "img_size": cfg.model.img_size,
                "test_img_size": cfg.model.img_size,
                "test_crop_pct": cfg.data.test_crop_pct,
                "global_pool": cfg.model.global_pool,
                "feature_bn": cfg.model.feature_bn,
                "num_classes": num_classes,
                "classes": list(train_set.classes),
                "init": cfg.init,
                "init_sha256": None if init_report is None else init_report["sha256"],
                "config_hash": derived["config_hash"],
                "steps": total_steps,
            }
            checkpoint.atomic_save(
                {"state_dict": probe.state_dict(), "meta": meta}, out / "model.pt"
            )
            atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            tracker.log_artifact(out / "metrics.json")
        return metrics
