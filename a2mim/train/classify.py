"""Pieces shared by the classification stages (``finetune``, ``linprobe``).

- ``create_classifier``: a timm classifier (``img_size`` only for models that take it).
- ``load_encoder``: a pre-training ``encoder.pt`` into a classifier's non-head weights, strictly;
  the only weights allowed to keep their fresh init are the classifier head's.
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

import difflib
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from a2mim.config import ConfigError
from a2mim.train import checkpoint
from a2mim.train.distributed import world_info
from a2mim.train.sampling import mix_seed

__all__ = [
    "AugSampler",
    "AugmentedDataset",
    "LinearProbe",
    "check_backbone",
    "create_classifier",
    "evaluate",
    "file_sha256",
    "load_classifier",
    "load_encoder",
    "rng_scope",
    "topk_correct",
    "tracked_derived",
]


log = logging.getLogger(__name__)


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


class AugSampler(Sampler[tuple[int, int, int]]):
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
        self.num_samples, self.seed, self.epoch, self.repeats = num_samples, seed, epoch, repeats
        self.start, self.rank, self.world_size = start, rank, world_size
        self.usable = num_samples if usable is None else usable

    def keys(self) -> list[tuple[int, int, int]]:
        """This rank's keys of the whole epoch (``start`` not applied)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=gen).tolist()
        seq = [(self.epoch, c, i) for i in perm for c in range(self.repeats)][: self.usable]
        return seq[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        yield from self.keys()[self.start :]

    def __len__(self) -> int:
        return max(0, self.usable // self.world_size - self.start)


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


def create_classifier(
    backbone: str,
    num_classes: int,
    img_size: int,
    backbone_kwargs: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(backbone, num_classes=..., img_size=..., **kwargs)``, random init.

    ``img_size`` goes to models that fix their input size at creation (transformers); models
    whose constructor does not take it (convolutional nets) accept any size. ``timm_kwargs``
    (``drop_path_rate``, ``global_pool``, ...) are passed on; ``None`` values are left out, so
    timm's defaults apply.
    """
    kwargs = {**(backbone_kwargs or {}), **{k: v for k, v in timm_kwargs.items() if v is not None}}
    try:
        return timm.create_model(
            backbone, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
        )
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)


def check_backbone(name: str, where: str = "config") -> None:
    """A ``ConfigError`` (with close names) unless ``name`` is a timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"{where}: model.backbone {name!r} is not a timm model"
            + (f" (did you mean one of {close}?)" if close else "")
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_encoder(
    model: nn.Module,
    path: str | Path,
    backbone: str,
    img_size: int,
    backbone_kwargs: dict[str, Any] | None = None,
    allow_new_head: bool = True,
) -> dict[str, Any]:
    """Load a pre-training ``encoder.pt`` (or a supervised classifier) into ``model``, strictly.

    The encoder holds the keys of ``create_classifier(backbone, 0, img_size, backbone_kwargs)``
    (timm's default pooling, no classifier), as ``a2mim pretrain`` writes them. Keys that
    ``model`` has beyond those (its classifier ``head``, and ``fc_norm`` when a ViT pools by
    averaging) keep their fresh init when ``allow_new_head``; encoder keys of layers that
    ``model`` turned off (a ViT's final ``norm``, replaced by ``fc_norm`` under average pooling,
    as MAE and BEiT fine-tune) are dropped. Any other difference is a ``ValueError`` that names
    the missing, unexpected and mis-shaped keys and what the checkpoint was trained with.

    A fine-tune run's ``model.pt`` (meta ``stage: finetune``) is accepted as a *supervised*
    encoder, the paper's "(Sup.)" baselines: :func:`supervised_encoder_state` turns the classifier
    into encoder keys first (its report is under ``supervised``).

    Returns a report: ``path``, ``sha256``, the checkpoint's ``meta``, ``loaded`` (number of
    tensors), ``head_init`` (keys left at init) and ``dropped`` (encoder keys not used).
    """
    path = Path(path)
    ckpt = checkpoint.load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(
            f"{path} is not an encoder checkpoint: expected a mapping with 'state_dict' and "
            f"'meta' as `a2mim pretrain` writes to <run>/encoder.pt"
        )
    meta = dict(ckpt.get("meta") or {})
    stage = meta.get("stage", "pretrain")
    if stage not in ("pretrain", "finetune"):
        raise ValueError(
            f"{path} is the output of stage {stage!r}; --init takes the encoder.pt of a pretrain "
            f"run or the model.pt of a finetune run (a supervised encoder)"
        )
    state = dict(ckpt["state_dict"])
    own = model.state_dict()
    encoder_keys = set(create_classifier(backbone, 0, img_size, backbone_kwargs).state_dict())
    supervised = None
    if stage == "finetune":
        state, supervised = supervised_encoder_state(state, encoder_keys)
    new = sorted(set(own) - encoder_keys) if allow_new_head else []
    dropped = sorted(k for k in encoder_keys - set(own) if k in state) if allow_new_head else []
    leaked = [k for k in new if k in state]
    if leaked:
        raise ValueError(
            f"encoder weights from {path} hold classifier keys {leaked[:8]}: an encoder.pt has "
            f"no head; pass the encoder.pt of a pretrain run"
        )
    for key in dropped:
        state.pop(key)
    try:
        checkpoint.load_encoder_strict(model, {**state, **{k: own[k] for k in new}}, str(path))
    except ValueError as exc:
        built = {
            "backbone": backbone,
            "backbone_kwargs": backbone_kwargs or {},
            "img_size": img_size,
        }
        trained = {k: meta.get(k) for k in built}
        if trained == built:
            hint = (
                f"  the checkpoint was trained with this backbone ({built}); the difference comes "
                f"from the model's options (global_pool, fc_norm, ...): keep timm's defaults"
            )
        else:
            hint = (
                f"  the checkpoint says {trained}; this config builds {built}: set "
                f"model.backbone / model.backbone_kwargs / model.img_size to match, or pass the "
                f"right checkpoint"
            )
        raise ValueError(f"{exc}\n{hint}") from None
    if meta.get("backbone") not in (None, backbone):
        log.warning(
            "%s was pre-trained as %r; its weights fit %r, loading them",
            path,
            meta["backbone"],
            backbone,
        )
    report = {
        "path": str(path),
        "sha256": file_sha256(path),
        "meta": meta,
        "loaded": len(state),
        "head_init": new,
        "dropped": dropped,
    }
    return report if supervised is None else {**report, "supervised": supervised}


def supervised_encoder_state(
    state: dict[str, torch.Tensor], encoder_keys: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The encoder weights of a fine-tuned timm classifier's ``state``: what transfer from a
    supervised model (the paper's "PyTorch (Sup.)" / "DeiT (Sup.)" rows) starts from.

    ``encoder_keys`` are those of the same backbone with ``num_classes=0`` and timm's default
    pooling, as ``encoder.pt`` holds them. The classifier (``head.*``, ``fc.*``: keys outside
    the encoder) is removed. A ViT fine-tuned with average pooling has no final ``norm`` but an
    ``fc_norm`` of the same shape (timm swaps one for the other): its ``fc_norm`` becomes
    ``norm``, the encoder's last LayerNorm (the transfer heads prune that layer anyway). Any
    other difference is left for the strict load to report. Returns the state and a report
    (``removed``, ``renamed``).
    """
    state = dict(state)
    renamed = []
    if not any(k.startswith("norm.") for k in state):
        for key in [k for k in state if k.startswith("fc_norm.")]:
            target = "norm." + key.removeprefix("fc_norm.")
            if target in encoder_keys:
                state[target] = state.pop(key)
                renamed.append(f"{key} -> {target}")
    removed = sorted(k for k in state if k not in encoder_keys)
    for key in removed:
        state.pop(key)
    return state, {"removed": removed, "renamed": renamed}


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
