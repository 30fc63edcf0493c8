"""Atomic checkpoints of plain tensors and metadata, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from a2mim.atomic import atomic_path


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = not_a_checkpoint(path)
    if problem:
        raise ValueError(problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


def not_a_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not a file ``torch.save`` wrote (its zip format), or None if it may be."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return None
    size = Path(path).stat().st_size
    if not head:
        kind = "an empty file"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = f"a text file ({size} bytes, starting {head[:32].decode()!r})"
    else:
        kind = f"a {size}-byte file in another format (first bytes {head[:8].hex()})"
    return (
        f"{path} is not a checkpoint: it is {kind}, where a PyTorch checkpoint (torch.save's zip "
        "format) is expected: encoder.pt of a pretrain run or model.pt of a finetune run"
    )


def load_encoder_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    """Load timm-keyed encoder weights strictly, with a readable diff on any mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shape:
        lines = [f"encoder weights from {source} do not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shape)):
            if keys:
                shown = ", ".join(keys[:8]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 8 else ""
                )
                lines.append(f"  {title} keys: {shown}")
        lines.append("  check that the checkpoint's backbone matches the config's backbone")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
