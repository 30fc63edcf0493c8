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
is a ``ConfigError`` on CPU/gloo, where SyncBatchNorm cannot run, and changes nothing in a single
process, where it computes exactly BatchNorm). The logged losses are the mean over ranks; rank 0
alone writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from a2mim.analysis.reconstruction import figure_batch, save_training_figure
from a2mim.config import ConfigError, CropFlipData, EpochRunConfig, bounded, from_dict, to_dict
from a2mim.data.device_pipeline import (
    CropRecipe,
    DeviceAugment,
    DevicePrefetcher,
    EncodedImages,
    collate_encoded,
)
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import pretrain_transform
from a2mim.mim import MaskedImageModel, MIMConfig, get_preset
from a2mim.train import checkpoint, engine
from a2mim.train.distributed import local_rows
from a2mim.train.knn import KnnMonitor, KnnMonitorConfig
from a2mim.train.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    check_step_epochs,
    scaled_lr,
)
from a2mim.train.sampling import SeededDataset, mix_seed

LOSS_KEYS = ("loss", "loss_spatial", "loss_freq")


@dataclass(frozen=True)
class ModelConfig:
    """A method preset (``a2mim.mim.presets``) plus overrides of its ``MIMConfig`` fields."""

    preset: str = "a2mim_resnet50"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig(CropFlipData):
    crop_scale: tuple[float, float] = bounded((0.67, 1.0), gt=0, le=1)  # SimMIM / A2MIM
    # pil: decode + augment in DataLoader workers (the reference); device: workers read bytes,
    # decode (nvJPEG) and crop on the training device (a2mim.data.device_pipeline)
    pipeline: Literal["pil", "device"] = "pil"


@dataclass(frozen=True)
class PretrainConfig(EpochRunConfig):
    """A pretrain YAML: the ``model`` (a preset and its overrides), ``data``, ``optim``
    sections, the run-control keys of :class:`~a2mim.config.EpochRunConfig`, and the
    reconstruction figures and k-NN monitor below."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm across processes (CUDA/NCCL only)
    figure_every_epochs: int = bounded(1, ge=1)
    figure_images: int = bounded(8, ge=1)
    knn: KnnMonitorConfig | None = None  # k-NN accuracy of the encoder every N epochs

    def mim_config(self) -> MIMConfig:
        try:
            base = get_preset(self.model.preset)
        except KeyError as exc:
            raise ConfigError(f"model.preset: {exc.args[0]}") from None
        return from_dict(MIMConfig, {**to_dict(base), **self.model.overrides}, "model.overrides")


class PretrainTask(engine.Task):
    """Masked image modelling: the model returns its loss; masks are drawn per global
    micro-batch; the "evaluation" is the reconstruction figure (rank 0), every
    ``figure_every_epochs`` epochs and at the end."""

    stage = "pretrain"

    def prepare(self, accum_steps: int) -> engine.Steps:
        cfg, world = self.cfg, self.ctx.world
        if cfg.sync_bn and world > 1 and self.ctx.device.type != "cuda":
            raise ConfigError(
                f"sync_bn: SyncBatchNorm needs CUDA processes (NCCL); this run has {world} "
                f"processes on {self.ctx.device.type}: set sync_bn: false (per-process "
                f"BatchNorm) or run on GPUs"
            )
        self.mim_cfg = cfg.mim_config()
        self.dataset = ImageFolderDataset(
            cfg.data.root, cfg.data.split, on_corrupt=cfg.data.on_corrupt
        )
        global_batch = cfg.batch_size * world * accum_steps
        what = f"{cfg.data.root}/{cfg.data.split}"
        per_epoch = engine.epoch_steps(len(self.dataset), global_batch, what)
        self.fig_batch = _figure_batch(cfg, self.mim_cfg) if self.ctx.rank == 0 else None
        return engine.Steps(cfg.epochs * per_epoch, global_batch, accum_steps, per_epoch)

    def build(self) -> None:
        cfg, steps = self.cfg, self.steps
        self.lr = scaled_lr(cfg.optim, steps.global_batch)
        self.model = MaskedImageModel(self.mim_cfg).to(self.ctx.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.ctx.world > 1:  # CUDA only (checked in prepare); in place
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        groups = self.model.param_groups(cfg.optim.weight_decay)
        self.optimizer = build_optimizer(groups, cfg.optim, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps.total, steps.per_epoch)
        transform = pretrain_transform(self.mim_cfg.img_size, cfg.data.crop_scale, cfg.data.hflip)
        self.seeded = SeededDataset(self.dataset, transform, cfg.seed)
        self.augment = None
        if cfg.data.pipeline == "device":
            recipe = CropRecipe(
                self.mim_cfg.img_size, cfg.data.crop_scale, hflip=0.5 if cfg.data.hflip else 0.0
            )
            self.augment = DeviceAugment(recipe, self.ctx.device, on_corrupt=cfg.data.on_corrupt)
            self.encoded = EncodedImages(self.dataset)
        self.knn = None
        if cfg.knn is not None:
            self.knn = KnnMonitor(cfg.knn, cfg.data, self.mim_cfg, self.ctx)

    def derived(self) -> dict[str, Any]:
        return {
            "num_images": len(self.dataset),
            "mim": to_dict(self.mim_cfg),
        }

    def tags(self) -> dict[str, str]:
        preset = self.cfg.model.preset
        return {"method": preset.split("_")[0], "backbone": self.mim_cfg.backbone, "preset": preset}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "torch_rng": torch.get_rng_state()}

    def batches(self, step: int):
        if self.augment is None:
            return self.epoch_batches(step, self.seeded, len(self.dataset))
        num, steps = len(self.dataset), self.steps
        raw = self.epoch_batches(step, self.encoded, num, collate_fn=collate_encoded)
        keys = [
            (s, m) for s in range(step, steps.segment_end(step)) for m in range(steps.accum_steps)
        ]
        # the next micro-batch is decoded and cropped on the device while this one trains
        pairs = zip(keys, raw, strict=False)  # keys: exactly this segment's micro-batches
        return iter(DevicePrefetcher(pairs, self._augment_batch, self.ctx.device))

    def _augment_batch(self, key_and_batch) -> torch.Tensor:
        (step, micro), (data, _, index_b) = key_and_batch
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 4, step, micro, self.ctx.rank))
        paths = [self.dataset.samples[i][0] for i in index_b.tolist()]
        return self.augment(data, gen, paths)

    def loss(self, train_model, batch, step, micro):
        ctx = self.ctx
        # the device path's batches are already on the device (see batches)
        img = batch if self.augment is not None else batch[0].to(ctx.device, non_blocking=True)
        if self.cfg.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        mask_bgg = _micro_masks(
            self.model, img.shape[0], self.cfg.seed, step, micro, ctx.rank, ctx.world
        )
        with ctx.autocast():
            out = train_model(img, mask_bgg.to(ctx.device))
        return out.loss, {k: getattr(out, k) for k in LOSS_KEYS}

    def logged_lr(self, step: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def eval_due(self, done: int) -> bool:
        epochs, rest = divmod(done, self.steps.per_epoch)
        due = epochs % self.cfg.figure_every_epochs == 0
        knn_due = self.knn is not None and epochs % self.cfg.knn.every_epochs == 0
        return rest == 0 and (due or knn_due)

    def evaluate(self, done: int) -> dict[str, float] | None:
        epochs = done // self.steps.per_epoch
        figure = epochs % self.cfg.figure_every_epochs == 0 or done == self.steps.end
        if self.ctx.rank == 0 and figure:
            fig_path = self.ctx.out / "figures" / f"recon_ep{epochs:04d}.png"
            save_training_figure(self.model, self.fig_batch, fig_path, self.cfg.model.preset)
            self.tracker.log_artifact(fig_path, "figures")
        if self.knn is not None and (
            epochs % self.cfg.knn.every_epochs == 0 or done == self.steps.end
        ):
            return self.knn.evaluate(self.model.encoder_state_dict())
        return None

    def final_metrics(self, last_eval, last_log) -> dict[str, Any]:
        return {"final_" + k: v for k, v in last_log.items()}

    def write_final(self, metrics: dict[str, Any]) -> list:
        cfg, mim_cfg = self.cfg, self.mim_cfg
        meta = {
            "stage": "pretrain",
            "backbone": mim_cfg.backbone,
            "backbone_kwargs": dict(mim_cfg.backbone_kwargs),
            "img_size": mim_cfg.img_size,
            "preset": cfg.model.preset,
            "config_hash": self.config_hash,
            "steps": self.steps.total,
        }
        checkpoint.atomic_save(
            {"state_dict": self.model.encoder_state_dict(), "meta": meta},
            self.ctx.out / "encoder.pt",
        )
        return []


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
    """The run's fixed reconstruction-figure batch (`figure_batch`)."""
    return figure_batch(cfg.data, mim_cfg.img_size, cfg.figure_images, cfg.seed)


def load_config(data: dict[str, Any], where: str = "config") -> PretrainConfig:
    cfg = from_dict(PretrainConfig, data, where)
    cfg.mim_config()  # validate the model overrides now, not mid-run
    check_step_epochs(cfg.optim, cfg.epochs)  # a milestone the run never reaches
    return cfg


__all__ = ["DataConfig", "ModelConfig", "PretrainConfig", "load_config", "run"]


run = engine.stage_runner(PretrainTask)
