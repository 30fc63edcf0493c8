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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from a2mim import atomic
from a2mim.config import ConfigError, ImageFolderData, bounded, from_dict
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.train import engine
from a2mim.train.classify import tracked_derived
from a2mim.train.distributed import resolve_device, world_info
from a2mim.train.encoder import check_backbone, create_classifier, load_encoder
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
class KnnMonitorConfig:
    """k-NN accuracy of the pretraining encoder every ``every_epochs`` epochs (and at the end),
    on ``data.split`` (bank) and ``data.val_split`` (queries) at ``test_crop_pct``."""

    every_epochs: int = bounded(1, ge=1)
    k: int = bounded(20, ge=1)
    temperature: float = bounded(0.07, gt=0)
    batch_size: int = bounded(64, ge=1)
    test_crop_pct: float = bounded(1.0, gt=0, le=1)


@dataclass(frozen=True)
class KnnModelConfig:
    """The timm encoder (``num_classes=0``: pooled features); as in ``linprobe``."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = bounded(224, ge=1)
    global_pool: str | None = None


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


def knn_scores(
    query_nd: torch.Tensor,
    bank_md: torch.Tensor,
    bank_labels_m: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """Class scores ``(N, C)`` of L2-normalised queries: the ``k`` most cosine-similar bank
    entries each add ``exp(similarity / temperature)`` to their label's score."""
    sim_nm = query_nd @ bank_md.T
    top_sim, top_idx = sim_nm.topk(min(k, bank_md.shape[0]), dim=1)
    weights_nk = (top_sim / temperature).exp()
    votes_nkc = F.one_hot(bank_labels_m[top_idx], num_classes).to(weights_nk.dtype)
    return (votes_nkc * weights_nk[..., None]).sum(1)


@torch.no_grad()
def extract(
    encoder: nn.Module, dataset: ImageFolderDataset, batch_size: int, ctx_autocast, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features ``(N, D)`` (float32) and labels ``(N,)`` of ``dataset``."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for img_bchw, target_b in engine.interruptible(DataLoader(dataset, batch_size=batch_size)):
        with ctx_autocast():
            feat = encoder(img_bchw.to(device))
        feats.append(F.normalize(feat.float(), dim=1).cpu())
        labels.append(target_b)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    encoder: nn.Module,
    bank: ImageFolderDataset,
    queries: ImageFolderDataset,
    k: int,
    temperature: float,
    batch_size: int,
    autocast,
    device,
) -> dict[str, float]:
    """``{"knn_top1", "knn_top5"}`` in percent of ``encoder`` (bank: ``bank``'s images)."""
    if bank.classes != queries.classes:
        raise ValueError("the bank and query splits need the same class folders")
    bank_md, bank_labels = extract(encoder, bank, batch_size, autocast, device)
    query_nd, query_labels = extract(encoder, queries, batch_size, autocast, device)
    scores_nc = knn_scores(query_nd, bank_md, bank_labels, len(bank.classes), k, temperature)
    top = scores_nc.topk(min(5, scores_nc.shape[1]), dim=1).indices
    hits = top == query_labels[:, None]
    n = len(query_labels)
    return {
        "knn_top1": 100.0 * float(hits[:, 0].sum()) / n,
        "knn_top5": 100.0 * float(hits.any(1).sum()) / n,
    }


def _datasets(data: ImageFolderData, img_size: int, crop_pct: float):
    transform = eval_transform(img_size, crop_pct)
    return (
        ImageFolderDataset(data.root, data.split, transform=transform, on_corrupt=data.on_corrupt),
        ImageFolderDataset(
            data.root, data.val_split, transform=transform, on_corrupt=data.on_corrupt
        ),
    )


class KnnMonitor:
    """The k-NN accuracy of a pretraining run's encoder (rank 0 evaluates; the others get
    None), from the encoder weights (``encoder_state_dict()``) loaded into a timm model."""

    def __init__(self, cfg: KnnMonitorConfig, data: ImageFolderData, mim_cfg, ctx: engine.Context):
        self.cfg, self.ctx = cfg, ctx
        if ctx.rank != 0:
            return
        self.encoder = create_classifier(
            mim_cfg.backbone, 0, mim_cfg.img_size, dict(mim_cfg.backbone_kwargs)
        ).to(ctx.device)
        self.bank, self.queries = _datasets(data, mim_cfg.img_size, cfg.test_crop_pct)

    def evaluate(self, encoder_state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        if self.ctx.rank != 0:
            return None
        self.encoder.load_state_dict(encoder_state, strict=True)
        c = self.cfg
        return knn_accuracy(
            self.encoder,
            self.bank,
            self.queries,
            c.k,
            c.temperature,
            c.batch_size,
            self.ctx.autocast,
            self.ctx.device,
        )


def run(cfg: KnnConfig, out_dir: str | Path) -> dict[str, float]:
    """k-NN accuracy of the ``init`` encoder into ``out_dir`` (rank 0 computes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    device = resolve_device(cfg.device)
    require_init(cfg.init)
    m = cfg.model
    bank, queries = _datasets(cfg.data, m.img_size, cfg.data.test_crop_pct)
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
