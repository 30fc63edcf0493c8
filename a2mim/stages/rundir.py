"""The run directory of a stage: resume state, ``resolved_config.yaml`` and the MLflow run.

Every stage opens its ``--out`` folder the same way: a checkpoint left there by an interrupted
run is loaded (and refused if it belongs to another config), the resolved config is written
(rank 0, atomically, only after that check so that a refused restart leaves the old record), and
the stage's MLflow run is opened or continued.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from a2mim import atomic
from a2mim.config import ConfigError, to_dict
from a2mim.tracking import Tracker
from a2mim.train import checkpoint

# Config fields that describe a run without changing what it computes: a run resumed with other
# values (e.g. the workflow's table-cell tags) is still the same run.
UNHASHED_FIELDS = ("tags", "progress", "track", "tracking_uri")


def config_hash(cfg: Any) -> str:
    """A short, stable hash of a config dataclass (the resolved values that change results)."""
    data = to_dict(cfg)
    for name in UNHASHED_FIELDS:
        data.pop(name, None)
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_run(
    stage: str,
    cfg: Any,
    out: Path,
    derived: dict[str, Any],
    tags: dict[str, str],
    rank: int,
    tracked: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, Tracker]:
    """``(resume state or None, tracker)`` for ``stage`` in ``out``.

    ``derived`` must hold ``config_hash``; ``tracked`` is the part of ``derived`` logged as
    MLflow params (default: all of it). ``cfg`` needs ``scale``, ``track`` and ``tracking_uri``; its
    ``tags`` (optional) become MLflow tags.
    """
    ckpt_path = out / "checkpoint.pt"
    state = checkpoint.load(ckpt_path) if ckpt_path.exists() else None
    if state is not None and state["config_hash"] != derived["config_hash"]:
        raise ConfigError(
            f"{out} holds a run with a different config (hash {state['config_hash']} vs "
            f"{derived['config_hash']}); use another --out or delete {ckpt_path}"
        )
    if rank == 0:
        atomic.write_text(
            out / "resolved_config.yaml",
            yaml.safe_dump({"stage": stage, **to_dict(cfg), "derived": derived}, sort_keys=False),
        )
    tracker = Tracker(
        out,
        stage,
        tags={
            **getattr(cfg, "tags", {}),
            **tags,
            "scale": cfg.scale,
            "config_hash": derived["config_hash"],
        },
        params={
            **{k: v for k, v in to_dict(cfg).items() if k not in UNHASHED_FIELDS},
            "derived": derived if tracked is None else tracked,
        },
        uri=cfg.tracking_uri,
        enabled=cfg.track and rank == 0,
    )
    return state, tracker
