"""Weighted k-NN accuracy of frozen features (DINO's ``knn_classifier``), and the monitor that
pretraining runs every N epochs; the ``knn`` stage runs the same computation once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from a2mim.config import ImageFolderData, bounded
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.train import engine
from a2mim.train.encoder import create_classifier


@dataclass(frozen=True)
class KnnMonitorConfig:
    """k-NN accuracy of the pretraining encoder every ``every_epochs`` epochs (and at the end),
    on ``data.split`` (bank) and ``data.val_split`` (queries) at ``test_crop_pct``."""

    every_epochs: int = bounded(1, ge=1)
    k: int = bounded(20, ge=1)
    temperature: float = bounded(0.07, gt=0)
    batch_size: int = bounded(64, ge=1)
    test_crop_pct: float = bounded(1.0, gt=0, le=1)


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


def knn_datasets(data: ImageFolderData, img_size: int, crop_pct: float):
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
        self.bank, self.queries = knn_datasets(data, mim_cfg.img_size, cfg.test_crop_pct)

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
