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
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim import predictions
from a2mim.config import (
    ConfigError,
    EpochWarmupCosine,
    ImageFolderData,
    TransferRunConfig,
    bounded,
    from_dict,
)
from a2mim.data.device_pipeline import (
    CropRecipe,
    DeviceAugment,
    DevicePrefetcher,
    EncodedImages,
    check_supported,
    collate_encoded,
)
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from a2mim.train import checkpoint, engine
from a2mim.train.classify import (
    AugmentedDataset,
    AugSampler,
    evaluate,
    rng_scope,
    tracked_derived,
)
from a2mim.train.distributed import broadcast_buffers
from a2mim.train.encoder import check_backbone, create_classifier, load_encoder
from a2mim.train.optim import build_epoch_scheduler, check_timm_optim
from a2mim.train.rundir import init_tags, require_init
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
    img_size: int = bounded(224, ge=1)
    global_pool: str | None = None
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)
    drop_rate: float = bounded(0.0, ge=0, lt=1)
    head_init_std: float | None = bounded(None, gt=0)


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


@dataclass(frozen=True)
class FinetuneConfig(TransferRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    epochs: int = bounded(100, ge=1)
    batch_size: int = bounded(256, ge=1)  # per process and micro-step
    channels_last: bool = False
    ema_decay: float | None = bounded(None, gt=0, lt=1)
    ema_warmup: bool = False
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
            _device_recipe(cfg)
        except ValueError as exc:
            raise ConfigError(f"{where}: data.pipeline=device: {exc}") from None
    return cfg


def _device_recipe(cfg: FinetuneConfig) -> CropRecipe:
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


def open_splits(cfg, test_size: int) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training split and the validation split (resized to ``test_size``) of an ImageFolder
    classification stage; an error when their classes differ."""
    d = cfg.data
    train_set = ImageFolderDataset(d.root, d.split, on_corrupt=d.on_corrupt)
    val_set = ImageFolderDataset(
        d.root,
        d.val_split,
        transform=eval_transform(test_size, d.test_crop_pct),
        on_corrupt=d.on_corrupt,
    )
    if val_set.classes != train_set.classes:
        raise ValueError(
            f"{d.root}: the classes of {d.split} ({len(train_set.classes)}) and "
            f"{d.val_split} ({len(val_set.classes)}) differ; both splits need the same "
            f"class folders"
        )
    return train_set, val_set


class ClassifyTask(engine.Task):
    """What fine-tuning and the linear probe share: ImageFolder splits, epochs of an
    `AugSampler` order, top-1/top-5 evaluation every ``eval_every_epochs`` epochs."""

    repeats = 1
    augment: DeviceAugment | None = None  # data.pipeline: device (fine-tuning only)

    def test_size(self) -> int:
        return self.cfg.model.img_size

    @property
    def epochs_run(self) -> int:
        """The epochs this run trains: ``epochs``, fewer when ``max_steps`` stops it early."""
        return self.steps.end // self.steps.per_epoch

    def prepare(self, accum_steps: int) -> engine.Steps:
        cfg = self.cfg
        require_init(cfg.init)
        self.train_set, self.val_set = open_splits(cfg, self.test_size())
        self.num_classes = len(self.train_set.classes)
        global_batch = cfg.batch_size * self.ctx.world * accum_steps
        what = f"{cfg.data.root}/{cfg.data.split}"
        per_epoch = engine.epoch_steps(len(self.train_set), global_batch, what)
        rank, world = self.ctx.rank, self.ctx.world
        self.val_loader = DataLoader(
            Subset(self.val_set, range(rank, len(self.val_set), world)),
            batch_size=cfg.data.eval_batch_size or cfg.batch_size,
            num_workers=cfg.data.num_workers,
        )
        return engine.Steps(cfg.epochs * per_epoch, global_batch, accum_steps, per_epoch)

    def derived(self) -> dict[str, Any]:
        return {
            "num_images": len(self.train_set),
            "num_val_images": len(self.val_set),
            "num_classes": self.num_classes,
            "classes": list(self.train_set.classes),
        }

    def tags(self) -> dict[str, str]:
        return init_tags(self.cfg.model.backbone, self.init_report)

    def tracked(self, derived: dict[str, Any]) -> dict[str, Any]:
        return tracked_derived(derived)

    def batches(self, step: int):
        num = len(self.train_set)
        if self.augment is None:
            return self.epoch_batches(
                step, self.seeded, num, AugSampler, sampler_repeats=self.repeats
            )
        raw = self.epoch_batches(
            step,
            self.encoded,
            num,
            AugSampler,
            sampler_repeats=self.repeats,
            collate_fn=collate_encoded,
        )
        steps = self.steps
        keys = [
            (s, m) for s in range(step, steps.segment_end(step)) for m in range(steps.accum_steps)
        ]
        # the next micro-batch is decoded and cropped on the device while this one trains
        pairs = zip(keys, raw, strict=False)  # keys: exactly this segment's micro-batches
        return iter(DevicePrefetcher(pairs, self._augment_batch, self.ctx.device))

    def _augment_batch(self, key_and_batch) -> tuple[torch.Tensor, torch.Tensor]:
        (step, micro), (data, target_b, index_b) = key_and_batch
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 4, step, micro, self.ctx.rank))
        paths = [self.train_set.samples[i][0] for i in index_b.tolist()]
        return self.augment(data, gen, paths), target_b.to(self.ctx.device, non_blocking=True)

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        img_bchw, target_b = batch
        img_bchw, target_b = (
            img_bchw.to(self.ctx.device, non_blocking=True),
            target_b.to(self.ctx.device),
        )
        if self.cfg.channels_last:
            img_bchw = img_bchw.contiguous(memory_format=torch.channels_last)
        return img_bchw, target_b

    def epoch_cosine(self):
        """The warm-up + cosine or step scheduler of ``cfg.optim`` (an `EpochWarmupCosine`)."""
        steps = self.steps
        return build_epoch_scheduler(self.optimizer, self.cfg.optim, steps.total, steps.per_epoch)

    def eval_due(self, done: int) -> bool:
        epochs, rest = divmod(done, self.steps.per_epoch)
        return rest == 0 and epochs % self.cfg.eval_every_epochs == 0

    def classify(self, model: nn.Module, collect: bool = False) -> dict[str, Any]:
        """top-1 / top-5 / loss of ``model`` on the whole validation set (every rank uses
        rank 0's BatchNorm statistics, the ones it saves); ``collect``: also this rank's
        per-sample predictions (`evaluate`)."""
        broadcast_buffers(model)
        loader = engine.interruptible(self.val_loader)
        return evaluate(model, loader, self.ctx.device, self.ctx.amp_dtype, collect=collect)

    def save_predictions(self, done: int, result: dict[str, Any]) -> None:
        """Every rank: the per-sample predictions of the evaluation after step ``done``, as
        ``predictions/epoch_<e>.npz`` (rank 0 writes), for the audit's paired statistics."""
        ctx, epoch = self.ctx, done // self.steps.per_epoch
        shard = range(ctx.rank, len(self.val_set), ctx.world)
        where = predictions.path_of(ctx.out, predictions.epoch_name(epoch))
        meta = {"stage": self.stage, "step": done, "epoch": epoch}
        predictions.save_classification(where, self.val_set, shard, result, ctx.rank, **meta)

    def record_extras(self, done: int) -> dict[str, float]:
        return {"epoch": done // self.steps.per_epoch}

    def meta(self) -> dict[str, Any]:
        """``model.pt``'s meta (what `load_classifier` rebuilds the network from)."""
        cfg = self.cfg
        return {
            "stage": self.stage,
            "backbone": cfg.model.backbone,
            "backbone_kwargs": dict(cfg.model.backbone_kwargs),
            "img_size": cfg.model.img_size,
            "test_img_size": self.test_size(),
            "test_crop_pct": cfg.data.test_crop_pct,
            "global_pool": cfg.model.global_pool,
            "num_classes": self.num_classes,
            "classes": list(self.train_set.classes),
            "init": cfg.init,
            "init_sha256": None if self.init_report is None else self.init_report["sha256"],
            "config_hash": self.config_hash,
            "steps": self.steps.total,
        }


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
            self.augment = DeviceAugment(_device_recipe(cfg), device, on_corrupt=on_corrupt)
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
