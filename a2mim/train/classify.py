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
- ``ClassifyTask``: the engine task both stages extend (ImageFolder splits via ``open_splits``,
  epochs of an ``AugSampler`` order, top-1/top-5 evaluation, ``model.pt``'s meta).
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
from torch.utils.data import DataLoader, Dataset, Subset

from a2mim import predictions
from a2mim.data.device_pipeline import DeviceAugment, DevicePrefetcher, collate_encoded
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.train import checkpoint, engine
from a2mim.train.distributed import broadcast_buffers, world_info
from a2mim.train.encoder import create_classifier
from a2mim.train.optim import build_epoch_scheduler
from a2mim.train.rundir import init_tags, require_init
from a2mim.train.sampling import EpochSampler, mix_seed, seed_cpu

__all__ = [
    "AugSampler",
    "AugmentedDataset",
    "ClassifyTask",
    "LinearProbe",
    "evaluate",
    "load_classifier",
    "open_splits",
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
        seed_cpu(seed)
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

    def __init__(self, *args: Any, repeats: int = 1, **kwargs: Any):
        """``args``/``kwargs``: :class:`EpochSampler`'s (``num_samples, seed, epoch, start,
        rank, world_size, usable``)."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        super().__init__(*args, **kwargs)
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
    collect: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent and mean cross-entropy over ``loader``.

    In distributed runs each rank passes its shard and the counts are summed over ranks.
    Returns ``{"top1", "top5", "loss", "n"}``; with ``collect`` also this rank's per-sample
    ``"pred"`` (arg-max class) and ``"label"`` (CPU int64 tensors, in the loader's order), for
    :mod:`a2mim.predictions`.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    preds, labels = [], []
    for img_bchw, target_b in loader:
        img_bchw, target_b = img_bchw.to(device), target_b.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits_bk = model(img_bchw)
        logits_bk = logits_bk.float()
        if collect:
            preds.append(logits_bk.argmax(1).cpu())
            labels.append(target_b.cpu())
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
    result: dict[str, Any] = {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "loss": sums[2].item() / n,
        "n": int(n),
    }
    if collect:
        empty = torch.zeros(0, dtype=torch.int64)
        result["pred"] = torch.cat(preds) if preds else empty
        result["label"] = torch.cat(labels) if labels else empty
    return result


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
