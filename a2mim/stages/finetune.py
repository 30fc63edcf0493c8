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

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn

from a2mim import predictions
from a2mim.config import (
    ConfigError,
    EncoderConfig,
    EpochRunConfig,
    TransferRunConfig,
    bounded,
    from_dict,
)
from a2mim.data.device_pipeline import DeviceAugment, EncodedImages, check_supported
from a2mim.train import checkpoint, engine
from a2mim.train.classify import AugmentedDataset, ClassifyTask, rng_scope
from a2mim.train.encoder import check_backbone, create_classifier, load_encoder
from a2mim.train.optim import check_timm_optim
from a2mim.train.sampling import mix_seed
from a2mim.train.timm_recipe import (
    DataConfig,
    FinetuneOptimConfig,
    LossConfig,
    MixupConfig,
    build_loss,
    build_optimizer,
    device_recipe,
    train_transform,
)

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
    "train_transform",
]


@dataclass(frozen=True)
class ModelConfig(EncoderConfig):
    """The timm classifier. ``backbone_kwargs`` and ``img_size`` must match the pre-training
    run's (``encoder.pt`` meta); ``global_pool: null`` keeps timm's default ("avg" for CNNs,
    "token" for ViTs); the reference ViT fine-tuning uses "avg", which in timm adds ``fc_norm``.
    ``head_init_std`` re-initialises the classifier weight with a truncated normal (MAE uses
    2e-5 for ViT fine-tuning); ``null`` keeps timm's init."""

    drop_path_rate: float = bounded(0.0, ge=0, lt=1)
    drop_rate: float = bounded(0.0, ge=0, lt=1)
    head_init_std: float | None = bounded(None, gt=0)


@dataclass(frozen=True)
class FinetuneConfig(TransferRunConfig, EpochRunConfig):
    """A finetune YAML: the ``model``, ``data``, ``mixup``, ``loss`` and ``optim`` sections, the
    weights' EMA (``ema_decay``: timm's ``ModelEmaV3``, evaluated beside the model; null: none)
    and the run-control keys of :class:`~a2mim.config.EpochRunConfig` and ``init``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ema_decay: float | None = bounded(None, gt=0, lt=1)
    ema_warmup: bool = False
    batch_size: int = bounded(256, ge=1)  # per process and micro-step
    eval_every_epochs: int = bounded(1, ge=1)


def load_config(data: dict[str, Any], where: str = "config") -> FinetuneConfig:
    """Validate a mapping into a ``FinetuneConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(FinetuneConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    check_timm_optim(cfg.optim.opt, cfg.optim.layer_decay, where)
    cfg.optim.check_schedule(cfg.epochs, where)
    if cfg.mixup.active and cfg.mixup.mode == "batch" and cfg.batch_size % 2:
        raise ConfigError(f"{where}: Mixup/CutMix in batch mode needs an even batch_size")
    if cfg.data.pipeline == "device":
        try:
            check_supported(cfg.data.auto_augment, cfg.data.color_jitter)
            device_recipe(cfg)
        except ValueError as exc:
            raise ConfigError(f"{where}: data.pipeline=device: {exc}") from None
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


class FinetuneTask(ClassifyTask):
    """End-to-end fine-tuning: Mixup / CutMix, timm losses, EMA, layer decay."""

    stage = "finetune"

    @property
    def repeats(self) -> int:
        return self.cfg.data.repeated_aug

    def test_size(self) -> int:
        return self.cfg.data.test_img_size or self.cfg.model.img_size

    def build(self) -> None:
        cfg, steps, device = self.cfg, self.steps, self.ctx.device
        self.lr = cfg.optim.scaled_lr(steps.global_batch)
        model, self.init_report = build_model(cfg, self.num_classes)
        model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim, self.lr)
        self.scheduler = self.epoch_cosine()
        self.ema = None
        if cfg.ema_decay:
            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.mixup = None
        if cfg.mixup.active:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup.mixup_alpha,
                cutmix_alpha=cfg.mixup.cutmix_alpha,
                prob=cfg.mixup.prob,
                switch_prob=cfg.mixup.switch_prob,
                mode=cfg.mixup.mode,
                label_smoothing=cfg.loss.smoothing,
                num_classes=self.num_classes,
            )
        self.loss_fn = build_loss(cfg.loss, self.mixup is not None)
        self.seeded = AugmentedDataset(self.train_set, train_transform(cfg), cfg.seed)
        self.augment = None
        if cfg.data.pipeline == "device":
            on_corrupt = cfg.data.on_corrupt
            self.augment = DeviceAugment(device_recipe(cfg), device, on_corrupt=on_corrupt)
            self.encoded = EncodedImages(self.train_set)

    def derived(self) -> dict[str, Any]:
        groups = self.optimizer.param_groups
        return {
            **super().derived(),
            "test_img_size": self.test_size(),
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "lr_scales": sorted({round(g.get("lr_scale", 1.0), 6) for g in groups}),
            "init": self.init_report,
        }

    def state(self) -> dict[str, Any]:
        state = super().state()
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])

    def loss(self, train_model, batch, step, micro):
        img_bchw, target = self.to_device(batch)
        if self.mixup is not None:
            with rng_scope(mix_seed(self.cfg.seed, 2, step, micro, self.ctx.rank)):
                img_bchw, target = self.mixup(img_bchw, target)  # target: (B, K) soft
        with self.ctx.autocast():
            logits_bk = train_model(img_bchw)
            loss = self.loss_fn(logits_bk.float(), target)
        return loss, {"loss": loss}

    def after_update(self, done: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=done)

    def evaluate(self, done: int) -> dict[str, float]:
        res = self.classify(self.model, collect=True)
        if done // self.steps.per_epoch > self.epochs_run - predictions.LAST_EPOCHS:
            self.save_predictions(done, res)  # the evaluations best_last10 chooses from
        row = {"top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"]}
        if self.ema is not None:
            res_ema = self.classify(self.ema.module)
            row.update(top1_ema=res_ema["top1"], top5_ema=res_ema["top5"])
            row["val_loss_ema"] = res_ema["loss"]
        return row

    def write_final(self, metrics: dict[str, Any]) -> list:
        # top1_final, top1_best_last10 (the authors' rule) and their predictions' artifacts
        metrics |= predictions.finish_classification(
            self.ctx.out, self.epochs_run, metrics, self.tracker, self.steps.end, best_last=True
        )
        saved = {"state_dict": self.model.state_dict(), "meta": self.meta()}
        if self.ema is not None:
            saved["state_dict_ema"] = self.ema.module.state_dict()
        checkpoint.atomic_save(saved, self.ctx.out / "model.pt")
        return []


run = engine.stage_runner(FinetuneTask)
