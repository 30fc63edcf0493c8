"""Pieces shared by the classification stages (``finetune``, ``linprobe``); the encoder itself
(create, load) is `a2mim.train.encoder`.

- ``LinearProbe``: a frozen backbone (always in eval mode) plus BatchNorm1d(affine=False) and a
  linear layer on its pooled features (MoCo / MAE linear-probe protocol).
- ``AugSampler`` + ``AugmentedDataset``: the order of epoch ``e`` and each sample's augmentation
  are functions of ``(seed, e, index, copy)`` alone, with torch, numpy and Python ``random`` all
  seeded (timm's RandAugment, random erasing and Mixup draw from all three), so a resumed run
  sees the batches an uninterrupted one would have seen.
- ``evaluate``: top-1 / top-5 accuracy (percent) and cross-entropy on a labelled loader.
- ``load_classifier``: rebuild the network stored in a stage's ``model.pt``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from a2mim.train import checkpoint
from a2mim.train.distributed import world_info
from a2mim.train.encoder import create_classifier
from a2mim.train.sampling import EpochSampler, mix_seed

__all__ = [
    "AugSampler",
    "AugmentedDataset",
    "LinearProbe",
    "evaluate",
    "load_classifier",
    "rng_scope",
    "topk_correct",
    "tracked_derived",
]


@contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed the CPU torch, numpy and Python ``random`` generators inside the block; restore
    all three afterwards, so the code outside sees no change."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AugSampler(EpochSampler):
    """Yields ``(epoch, copy, index)`` keys of one epoch, from position ``start``.

    The epoch's order is a permutation drawn from ``(seed, epoch)``; with ``repeats = R > 1``
    each index is repeated ``R`` times in a row (repeated augmentation, as timm's
    ``RepeatAugSampler``: an epoch still has ``usable`` samples, so it covers ``1/R`` of the
    images, each in ``R`` differently augmented copies). The sequence is truncated to
    ``usable`` and rank ``r`` of ``world_size`` takes every ``world_size``-th key from ``r``.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        epoch: int,
        repeats: int = 1,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        usable: int | None = None,
    ):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        super().__init__(num_samples, seed, epoch, start, rank, world_size, usable)
        self.repeats = repeats

    def keys(self) -> list[tuple[int, int, int]]:
        """This rank's keys of the whole epoch (``start`` not applied)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=gen).tolist()
        seq = [(self.epoch, c, i) for i in perm for c in range(self.repeats)][: self.usable]
        return seq[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        yield from self.keys()[self.start :]


class AugmentedDataset(Dataset):
    """Wraps a dataset of ``(img, target)`` items: key ``(epoch, copy, index)`` returns
    ``(transform(img), target)`` with torch, numpy and ``random`` seeded from
    ``(seed, epoch, copy, index)`` during the transform."""

    def __init__(self, dataset: Any, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, copy, index = key
        img, target = self.dataset[index]
        with rng_scope(mix_seed(self.seed, epoch, copy, index)):
            return self.transform(img), target


class LinearProbe(nn.Module):
    """Frozen ``backbone`` (a timm model with ``num_classes=0``, returning pooled features
    ``(B, D)``) + ``BatchNorm1d(D, affine=False)`` (optional) + ``Linear(D, K)``.

    The backbone's parameters do not require grad and it stays in eval mode whatever
    ``train()`` says, so its BatchNorm statistics never move. ``forward(img_bchw)`` returns
    logits ``(B, K)``.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, feature_bn: bool = True, init_std: float = 0.01
    ):
        super().__init__()
        dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.backbone = backbone.requires_grad_(False).eval()
        fc = nn.Linear(dim, num_classes)
        nn.init.normal_(fc.weight, std=init_std)
        nn.init.zeros_(fc.bias)
        norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if feature_bn else nn.Identity()
        self.head = nn.Sequential(norm, fc)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, img_bchw: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, D)``, without autograd."""
        with torch.no_grad():
            return self.backbone(img_bchw)

    def forward(self, img_bchw: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(img_bchw).float())


def topk_correct(logits_bk: torch.Tensor, target_b: torch.Tensor, ks: Iterable[int]) -> list[int]:
    """Number of samples whose target is among the ``k`` largest logits, for each ``k``
    (``k`` is capped at the number of classes)."""
    ks = list(ks)
    kmax = min(max(ks), logits_bk.shape[1])
    top_bk = logits_bk.topk(kmax, dim=1).indices
    hit_bk = top_bk == target_b[:, None]
    return [int(hit_bk[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent and mean cross-entropy over ``loader``.

    In distributed runs each rank passes its shard and the counts are summed over ranks.
    Returns ``{"top1", "top5", "loss", "n"}``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for img_bchw, target_b in loader:
        img_bchw, target_b = img_bchw.to(device), target_b.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits_bk = model(img_bchw)
        logits_bk = logits_bk.float()
        c1, c5 = topk_correct(logits_bk, target_b, (1, 5))
        loss = nn.functional.cross_entropy(logits_bk, target_b, reduction="sum").item()
        sums += torch.tensor([c1, c5, loss, target_b.shape[0]], dtype=torch.float64)
    model.train(was_training)
    _, world = world_info()
    if world > 1:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    n = sums[3].item()
    if n == 0:
        raise ValueError("evaluate got no images; check the validation split")
    return {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "loss": sums[2].item() / n,
        "n": int(n),
    }


def tracked_derived(derived: dict[str, Any]) -> dict[str, Any]:
    """The ``derived`` values of a classification stage worth logging as MLflow params: the
    class names are left out and the init report shrinks to the checkpoint's path, digest and
    pre-training preset."""
    init = derived.get("init")
    short = None
    if init is not None:
        short = {"path": init["path"], "sha256": init["sha256"]}
        short["preset"] = init["meta"].get("preset")
    return {**{k: v for k, v in derived.items() if k not in ("classes", "init")}, "init": short}


def load_classifier(path: str | Path, ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier stored in a ``finetune`` or ``linprobe`` run's ``model.pt``, in eval mode,
    with its ``meta`` (``img_size``, ``test_img_size``, ``test_crop_pct``, ``classes``, ...).
    ``ema=True`` takes the fine-tune EMA weights (an error if the run kept none)."""
    saved = checkpoint.load(path)
    meta = saved["meta"]
    key = "state_dict_ema" if ema else "state_dict"
    if key not in saved:
        raise ValueError(f"{path} holds no {key!r} (the run had no EMA); use ema=False")
    arch = (meta["backbone"], meta["img_size"], meta["backbone_kwargs"])
    pool = meta.get("global_pool")
    if meta["stage"] == "finetune":
        model = create_classifier(arch[0], meta["num_classes"], arch[1], arch[2], global_pool=pool)
    elif meta["stage"] == "linprobe":
        backbone = create_classifier(arch[0], 0, arch[1], arch[2], global_pool=pool)
        model = LinearProbe(backbone, meta["num_classes"], meta["feature_bn"])
    else:
        raise ValueError(f"{path} is from stage {meta['stage']!r}, not finetune or linprobe")
    model.load_state_dict(saved[key], strict=True)
    return model.eval(), meta
