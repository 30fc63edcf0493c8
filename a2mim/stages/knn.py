"""Stage ``knn``: weighted k-NN classification on frozen encoder features (DINO / solo-learn).

Every training image (resized, centre-cropped, no augmentation) becomes a feature bank entry: the
encoder's pooled features, L2-normalised. A validation image's class is the vote of its ``k``
nearest bank entries by cosine similarity ``s``, each voting for its label with weight
``exp(s / temperature)`` (DINO's ``knn_classifier``: k 20, temperature 0.07). ``knn_top1`` /
``knn_top5`` are in percent. No training, no labels used for the features: a quick read of what
pre-training learned. The same computation runs inside pretraining as a monitor
(``knn: {every_epochs: N}`` in a pretrain config; off in the recipes) and logs ``knn_top1``.

``run(cfg, out_dir) -> metrics`` writes ``resolved_config.yaml`` and ``metrics.json`` and logs
them to MLflow; ``init`` is a pretrain ``encoder.pt`` (or a finetune ``model.pt``, a supervised
encoder); without it the features are those of a random-init backbone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from a2mim import atomic
from a2mim.config import ConfigError, EncoderConfig, ImageFolderData, bounded, from_dict
from a2mim.train import engine
from a2mim.train.classify import tracked_derived
from a2mim.train.distributed import resolve_device, world_info
from a2mim.train.encoder import check_backbone, create_classifier, load_encoder
from a2mim.train.knn import KnnMonitor, KnnMonitorConfig, knn_accuracy, knn_datasets, knn_scores
from a2mim.train.rundir import config_hash, init_tags, open_run, require_init

__all__ = [
    "KnnConfig",
    "KnnMonitor",
    "KnnMonitorConfig",
    "knn_scores",
    "load_config",
    "run",
]


@dataclass(frozen=True)
class KnnModelConfig(EncoderConfig):
    """The timm encoder (``num_classes=0``: pooled features); as in ``linprobe``."""


@dataclass(frozen=True)
class KnnData(ImageFolderData):
    test_crop_pct: float = bounded(0.875, gt=0, le=1)


@dataclass(frozen=True)
class KnnConfig:
    model: KnnModelConfig = field(default_factory=KnnModelConfig)
    data: KnnData = field(default_factory=KnnData)
    scale: str = "paper"
    init: str | None = None  # pretrain encoder.pt / finetune model.pt; null: random features
    k: int = bounded(20, ge=1)
    temperature: float = bounded(0.07, gt=0)
    batch_size: int = bounded(256, ge=1)
    amp: str = "none"
    seed: int = bounded(0, ge=0)  # the random init without init
    device: str = "auto"
    progress: bool = True
    track: bool = True
    tracking_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def load_config(data: dict[str, Any], where: str = "config") -> KnnConfig:
    cfg = from_dict(KnnConfig, data, where)
    check_backbone(cfg.model.backbone, where)
    if cfg.amp not in engine.AMP_DTYPES:
        raise ConfigError(f"{where}.amp: {cfg.amp!r} is not one of {list(engine.AMP_DTYPES)}")
    if cfg.scale not in ("tiny", "small", "paper"):
        raise ConfigError(f"{where}.scale: {cfg.scale!r} is not one of tiny, small, paper")
    return cfg


def run(cfg: KnnConfig, out_dir: str | Path) -> dict[str, float]:
    """k-NN accuracy of the ``init`` encoder into ``out_dir`` (rank 0 computes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    device = resolve_device(cfg.device)
    require_init(cfg.init)
    m = cfg.model
    bank, queries = knn_datasets(cfg.data, m.img_size, cfg.data.test_crop_pct)
    torch.manual_seed(cfg.seed)
    encoder = create_classifier(
        m.backbone, 0, m.img_size, m.backbone_kwargs, global_pool=m.global_pool
    ).to(device)
    report = None
    if cfg.init is not None:
        report = load_encoder(
            encoder, cfg.init, m.backbone, m.img_size, m.backbone_kwargs, allow_new_head=False
        )
    derived = {
        "num_images": len(bank),
        "num_val_images": len(queries),
        "num_classes": len(bank.classes),
        "init": report,
        "config_hash": config_hash(cfg),
    }
    _, tracker = open_run(
        "knn", cfg, out, derived, init_tags(m.backbone, report), rank, tracked_derived(derived)
    )
    ctx = engine.Context(out, rank, world, device, engine.AMP_DTYPES[cfg.amp])
    with tracker:
        metrics = knn_accuracy(
            encoder, bank, queries, cfg.k, cfg.temperature, cfg.batch_size, ctx.autocast, device
        )
        if rank == 0:
            tracker.log_metrics(metrics, 0)
            atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            tracker.log_artifact(out / "resolved_config.yaml")
            tracker.log_artifact(out / "metrics.json")
    return metrics
