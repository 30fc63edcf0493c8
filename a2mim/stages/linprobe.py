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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from a2mim import predictions
from a2mim.config import (
    CropFlipData,
    EncoderConfig,
    EpochRunConfig,
    EpochWarmupCosine,
    TransferRunConfig,
    bounded,
    from_dict,
)
from a2mim.data.transforms import pretrain_transform
from a2mim.train import checkpoint, engine
from a2mim.train.classify import AugmentedDataset, ClassifyTask, LinearProbe
from a2mim.train.encoder import check_backbone, create_classifier, load_encoder

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
class ModelConfig(EncoderConfig):
    """The frozen backbone and the probe. ``backbone_kwargs`` and ``img_size`` must match the
    pre-training run's; ``global_pool: null`` keeps timm's default pooling ("avg" for CNNs, the
    cls token after the final norm for ViTs, as MoCo v3 / MAE probe). ``feature_bn`` puts
    ``BatchNorm1d(affine=False)`` before the linear layer (MAE); the linear weight is drawn
    from N(0, ``head_init_std``^2), its bias 0."""

    feature_bn: bool = True
    head_init_std: float = bounded(0.01, gt=0)


@dataclass(frozen=True)
class DataConfig(CropFlipData):
    test_crop_pct: float = bounded(0.875, gt=0, le=1)
    eval_batch_size: int | None = bounded(None, ge=1)


@dataclass(frozen=True)
class ProbeOptimConfig(EpochWarmupCosine):
    """SGD on the probe (MoCo: base lr 30 per 256 images, no weight decay), optional linear
    warm-up, then per-iteration cosine to ``min_lr`` or (``schedule: step``) x``step_gamma``
    at each of ``step_epochs``."""

    base_lr: float = bounded(30.0, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    nesterov: bool = False


@dataclass(frozen=True)
class LinprobeConfig(TransferRunConfig, EpochRunConfig):
    """A linprobe YAML: the ``model`` (the frozen encoder and the probe), ``data`` and
    ``optim`` sections and the run-control keys of :class:`~a2mim.config.EpochRunConfig` and
    ``init``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    batch_size: int = bounded(256, ge=1)  # per process
    eval_every_epochs: int = bounded(1, ge=1)


def load_config(data: dict[str, Any], where: str = "config") -> LinprobeConfig:
    """Validate a mapping into a ``LinprobeConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(LinprobeConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    cfg.optim.check_schedule(cfg.epochs, where)
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


class LinprobeTask(ClassifyTask):
    """The probe's head trains (SGD) on the frozen backbone's features; the checkpoint holds
    the head only."""

    stage = "linprobe"
    nonfinite_hint = "lower optim.base_lr"

    def build(self) -> None:
        cfg, steps = self.cfg, self.steps
        self.lr = cfg.optim.scaled_lr(steps.global_batch)
        self.probe, self.init_report = build_probe(cfg, self.num_classes)
        self.probe.to(self.ctx.device)
        if cfg.channels_last:
            self.probe.backbone.to(memory_format=torch.channels_last)
        self.model = self.probe
        self.optimizer = torch.optim.SGD(
            self.probe.head.parameters(),
            lr=self.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = self.epoch_cosine()
        transform = pretrain_transform(cfg.model.img_size, cfg.data.crop_scale, cfg.data.hflip)
        self.seeded = AugmentedDataset(self.train_set, transform, cfg.seed)

    def derived(self) -> dict[str, Any]:
        return {
            **super().derived(),
            "feature_dim": self.probe.head[1].in_features,
            "init": self.init_report,
        }

    def train_module(self) -> nn.Module:
        return self.probe.head

    def state(self) -> dict[str, Any]:
        return {"head": self.probe.head.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.probe.head.load_state_dict(state["head"])

    def clip_parameters(self):
        return self.probe.head.parameters()

    def loss(self, train_head, batch, step, micro):
        img_bchw, target_b = self.to_device(batch)
        with self.ctx.autocast():
            feat_bd = self.probe.features(img_bchw)
        logits_bk = train_head(feat_bd.float())
        loss = nn.functional.cross_entropy(logits_bk, target_b)
        return loss, {"loss": loss}

    def logged_lr(self, step: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, done: int) -> dict[str, float]:
        res = self.classify(self.probe, collect=True)
        if done == self.steps.end:
            self.save_predictions(done, res)  # the final evaluation, for the paired statistics
        return {"top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"]}

    def write_final(self, metrics: dict[str, Any]) -> list:
        # top1_final and the final evaluation's predictions (artifact predictions/final.npz)
        metrics |= predictions.finish_classification(
            self.ctx.out, self.epochs_run, metrics, self.tracker, self.steps.end
        )
        meta = {**self.meta(), "feature_bn": self.cfg.model.feature_bn}
        saved = {"state_dict": self.probe.state_dict(), "meta": meta}
        checkpoint.atomic_save(saved, self.ctx.out / "model.pt")
        return []


run = engine.stage_runner(LinprobeTask)
