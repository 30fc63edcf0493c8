"""The encoder: a timm model created with or without ``img_size``, and loaded strictly from a
pretrain ``encoder.pt`` (or a fine-tuned classifier: the supervised encoders) with a readable
diff of the keys on any mismatch. Every stage and transfer head creates and loads its encoder
here.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from a2mim.config import ConfigError
from a2mim.train import checkpoint

__all__ = [
    "check_backbone",
    "create_classifier",
    "file_sha256",
    "load_encoder",
    "supervised_encoder_state",
]

log = logging.getLogger(__name__)


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
