"""Stage ``pretrain``: A²MIM / SimMIM pre-training on an ImageFolder (labels ignored).

``run(cfg, out_dir) -> metrics``. The run directory holds ``resolved_config.yaml``,
``checkpoint.pt`` (latest full state, atomic), ``encoder.pt`` (timm-keyed encoder weights for the
downstream stages; no mask token, no decoder), ``metrics.jsonl`` (per logged step),
``metrics.json`` (final) and ``figures/recon_*.png``. Restarting the same command on the same
directory resumes from ``checkpoint.pt``; on the CPU in deterministic mode the final weights are
bit-identical to an uninterrupted run.

Under torchrun / Submitit (``world_size`` processes, ``batch_size`` each) a run sees the same
images, augmentations and masks as one process with ``batch_size * world_size``: masks are drawn
for the global micro-batch and sliced per rank. What stays per rank: the frequency loss's focal
weights (normalised over each rank's batch, as in the reference code), drop path draws and, unless
``sync_bn`` is set, BatchNorm batch statistics (the reference ResNet-50 configs use SyncBN:
``sync_bn: true`` converts BatchNorm to ``SyncBatchNorm`` when several CUDA processes train; it
is a ``ConfigError`` on CPU/gloo, where SyncBatchNorm cannot run, and changes nothing in a
single process, where it computes exactly BatchNorm). The logged losses are the mean over ranks; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from a2mim import atomic
from a2mim.analysis.reconstruction import reconstruction_panels, save_reconstruction_figure
from a2mim.config import ConfigError, from_dict, to_dict
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform, pretrain_transform
from a2mim.mim import MaskedImageModel, MIMConfig, get_preset
from a2mim.mim.masking import fill_masked, upsample_mask
from a2mim.stages.rundir import config_hash, open_run
from a2mim.train import checkpoint, steplog
from a2mim.train.distributed import (
    local_rows,
    mean_over_ranks,
    rank_seed,
    resolve_device,
    world_info,
)
from a2mim.train.optim import OptimConfig, build_optimizer, build_scheduler, scaled_lr
from a2mim.train.sampling import EpochSampler, SeededDataset, mix_seed

LOSS_KEYS = ("loss", "loss_spatial", "loss_freq")


@dataclass(frozen=True)
class ModelConfig:
    """A method preset (``a2mim.mim.presets``) plus overrides of its ``MIMConfig`` fields."""

    preset: str = "a2mim_resnet50"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/imagenet"
    split: str = "train"
    val_split: str = "val"
    skip_corrupt: bool = False
    num_workers: int = 0
    crop_scale: tuple[float, float] = (0.67, 1.0)
    hflip: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: Literal["tiny", "small", "paper"] = "paper"
    epochs: int = 100
    batch_size: int = 64  # per process and micro-step
    accum_steps: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm across processes (CUDA/NCCL only)
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ckpt_every_steps: int = 500
    log_every_steps: int = 10
    figure_every_epochs: int = 1
    figure_images: int = 8
    progress: bool = True
    track: bool = True  # MLflow (a2mim.tracking); rank 0 only
    tracking_uri: str | None = None  # default: sqlite under the results folder, or env
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (not hashed)

    def mim_config(self) -> MIMConfig:
        try:
            base = get_preset(self.model.preset)
        except KeyError as exc:
            raise ConfigError(f"model.preset: {exc.args[0]}") from None
        return from_dict(MIMConfig, {**to_dict(base), **self.model.overrides}, "model.overrides")


def run(cfg: PretrainConfig, out_dir: str | Path) -> dict[str, float]:
    """Pre-train (or resume) into ``out_dir``; returns the final metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    device = resolve_device(cfg.device)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError(
            f"sync_bn: SyncBatchNorm needs CUDA processes (NCCL); this run has {world} processes "
            f"on {device.type}: set sync_bn: false (per-process BatchNorm) or run on GPUs"
        )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    mim_cfg = cfg.mim_config()

    dataset = ImageFolderDataset(
        cfg.data.root, cfg.data.split, on_corrupt="skip" if cfg.data.skip_corrupt else "error"
    )
    micro_global = cfg.batch_size * world
    global_batch = micro_global * cfg.accum_steps
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.root}/{cfg.data.split} has {len(dataset)} images, fewer than one global "
            f"batch of {global_batch} (batch_size x accum_steps x processes): lower batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    lr = scaled_lr(cfg.optim, global_batch)
    derived = {
        "global_batch": global_batch,
        "lr": lr,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "world_size": world,
        "num_images": len(dataset),
        "skipped_images": len(dataset.skipped),
        "config_hash": config_hash(cfg),
        "mim": to_dict(mim_cfg),
    }
    state, tracker = open_run(
        "pretrain",
        cfg,
        out,
        derived,
        tags={
            "method": cfg.model.preset.split("_")[0],
            "backbone": mim_cfg.backbone,
            "preset": cfg.model.preset,
        },
        rank=rank,
        tracked={k: v for k, v in derived.items() if k != "mim"},
    )
    try:
        metrics = _train(cfg, out, mim_cfg, dataset, derived, device, rank, world, tracker, state)
    except BaseException as exc:
        tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close()
    return metrics


def _train(
    cfg, out, mim_cfg, dataset, derived, device, rank, world, tracker, state
) -> dict[str, float]:
    """The training loop; ``state`` is the checkpoint to resume from (or None)."""
    steps_per_epoch = derived["steps_per_epoch"]
    total_steps = derived["total_steps"]
    global_batch = derived["global_batch"]
    lr = derived["lr"]
    if rank == 0:
        tracker.log_artifact(out / "resolved_config.yaml")
    torch.manual_seed(cfg.seed)
    model = MaskedImageModel(mim_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world > 1:  # CUDA only (checked in run); same parameters, in place
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model.param_groups(cfg.optim.weight_decay), cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    step = 0
    ckpt_path = out / "checkpoint.pt"
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        steplog.truncate(out / "metrics.jsonl", step)
    scheduler.step_update(step)

    seeded = SeededDataset(
        dataset,
        pretrain_transform(mim_cfg.img_size, cfg.data.crop_scale, cfg.data.hflip),
        cfg.seed,
    )
    fig_batch = _figure_batch(cfg, mim_cfg) if rank == 0 else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    log = steplog.TrainLog.of_stage(cfg, out, tracker, total_steps, step, rank, "pretrain")

    def save(step_done: int) -> None:
        if rank != 0:
            return
        tracker.flush()  # metrics up to this step are in the store before the checkpoint
        checkpoint.atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step_done,
                "config_hash": derived["config_hash"],
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_path,
        )

    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        sampler = EpochSampler(
            len(dataset),
            cfg.seed,
            epoch,
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
            persistent_workers=False,
        )
        batches = iter(loader)
        for step in range(step, (epoch + 1) * steps_per_epoch):  # noqa: B020
            model.train()
            torch.manual_seed(rank_seed(mix_seed(cfg.seed, 1, step), rank))  # drop path, dropout
            sums_k = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
            for micro in range(cfg.accum_steps):
                img, _ = next(batches)
                img = img.to(device, non_blocking=True)
                if cfg.channels_last:
                    img = img.contiguous(memory_format=torch.channels_last)
                mask_bgg = _micro_masks(model, img.shape[0], cfg.seed, step, micro, rank, world)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out_ = train_model(img, mask_bgg.to(device))
                scaler.scale(out_.loss / cfg.accum_steps).backward()
                parts = [getattr(out_, k).detach().double() for k in LOSS_KEYS]
                sums_k += torch.stack(parts) / cfg.accum_steps
            # mean over ranks: the global batch's spatial loss (equal shards and mask counts);
            # every rank gets the same values, so all stop together on a non-finite loss
            sums = dict(zip(LOSS_KEYS, mean_over_ranks(sums_k).tolist(), strict=True))
            if not all(math.isfinite(v) for v in sums.values()):
                raise FloatingPointError(
                    f"non-finite loss {sums} at step {step}; lower the lr or disable fp16"
                )
            if cfg.optim.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step_update(step + 1)
            done = step + 1
            row = {
                **sums,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch": epoch + (done - epoch * steps_per_epoch) / steps_per_epoch,
            }
            log.step(done, global_batch, row)
            if done % cfg.ckpt_every_steps == 0 and done != total_steps:
                save(done)
        step = (epoch + 1) * steps_per_epoch
        if rank == 0 and ((epoch + 1) % cfg.figure_every_epochs == 0 or step == total_steps):
            fig_path = out / "figures" / f"recon_ep{epoch + 1:04d}.png"
            _save_figure(model, fig_batch, fig_path, cfg)
            tracker.log_artifact(fig_path, "figures")
    log.close()

    save(total_steps)
    metrics = {"final_" + k: v for k, v in log.last.items()}
    if rank == 0:
        meta = {
            "stage": "pretrain",
            "backbone": mim_cfg.backbone,
            "backbone_kwargs": dict(mim_cfg.backbone_kwargs),
            "img_size": mim_cfg.img_size,
            "preset": cfg.model.preset,
            "config_hash": derived["config_hash"],
            "steps": total_steps,
        }
        checkpoint.atomic_save(
            {"state_dict": model.encoder_state_dict(), "meta": meta}, out / "encoder.pt"
        )
        atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _micro_masks(
    model: MaskedImageModel, batch: int, seed: int, step: int, micro: int, rank: int, world: int
) -> torch.Tensor:
    """This rank's bool cell masks ``(batch, g, g)`` for micro-batch ``micro`` of ``step``.

    The masks of the whole global micro-batch (``batch * world`` rows) are drawn from one
    generator seeded by ``(seed, step, micro)`` and this rank keeps the rows of its own samples,
    so an image gets the same mask whatever the number of processes. (The trailing 0 of the
    seed keeps the masks of single-process runs from before masks were rank-independent.)
    """
    gen = torch.Generator().manual_seed(mix_seed(seed, 2, step, micro, 0))
    return local_rows(model.masker(batch * world, generator=gen), rank, world)


def _figure_batch(cfg: PretrainConfig, mim_cfg: MIMConfig):
    """Fixed validation images and masks for reconstruction figures (same every epoch)."""
    root = Path(cfg.data.root)
    split = cfg.data.val_split if (root / cfg.data.val_split).is_dir() else cfg.data.split
    ds = ImageFolderDataset(root, split, transform=eval_transform(mim_cfg.img_size, 1.0))
    step = max(1, len(ds) // cfg.figure_images)
    imgs = torch.stack([ds[i][0] for i in range(0, step * cfg.figure_images, step)][: len(ds)])
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 3))
    return imgs, gen.get_state()


@torch.no_grad()
def _save_figure(model: MaskedImageModel, fig_batch, path: Path, cfg: PretrainConfig) -> None:
    imgs, gen_state = fig_batch
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator()
    gen.set_state(gen_state)
    mask = model.masker(imgs.shape[0], generator=gen)
    out = model(imgs.to(device), mask.to(device))
    mask_pix = upsample_mask(mask, model.cfg.mask_patch_size)[:, None]
    filled = fill_masked(imgs, mask_pix, model.cfg.fill)
    shown = filled if model.cfg.fill != "none" else None
    panels = reconstruction_panels(imgs, out.pred_bchw.float().cpu(), mask_pix[:, 0], shown)
    title = f"{cfg.model.preset} - {path.stem} - loss {out.loss.item():.4f}"
    save_reconstruction_figure(panels, path, title=title)


def load_config(data: dict[str, Any], where: str = "config") -> PretrainConfig:
    cfg = from_dict(PretrainConfig, data, where)
    cfg.mim_config()  # validate the model overrides now, not mid-run
    return cfg


__all__ = ["DataConfig", "ModelConfig", "PretrainConfig", "load_config", "run"]
