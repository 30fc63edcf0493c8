"""The run directory of a stage: resume state, ``resolved_config.yaml`` and the MLflow run.

Every stage opens its ``--out`` folder the same way: a checkpoint left there by an interrupted
run is loaded (and refused if it belongs to another config), the resolved config is written
(rank 0, atomically, only after that check so that a refused restart leaves the old record), and
the stage's MLflow run is opened or continued.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from a2mim import atomic
from a2mim.config import ConfigError, to_dict
from a2mim.tracking import RUN_ID_FILE, Tracker
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


_RUN_LOCKS: dict[Path, int] = {}


class RunInUseError(ConfigError):
    """Another live process is running the same run folder."""


def init_tags(backbone: str, init_report: dict | None) -> dict[str, str]:
    """MLflow tags of a downstream run: ``method`` and ``preset`` of the pre-training run whose
    encoder initialised it (``scratch`` without one, ``supervised`` for a fine-tuned classifier,
    ``unknown`` when its meta names none)."""
    if init_report is None:
        preset = "scratch"
    elif init_report["meta"].get("stage") == "finetune":
        preset = "supervised"
    else:
        preset = init_report["meta"].get("preset") or "unknown"
    return {"method": preset.split("_")[0], "backbone": backbone, "preset": preset}


def require_init(init: str | None) -> None:
    """A ``FileNotFoundError`` naming what ``--init`` takes, unless ``init`` is None or a file."""
    if init is not None and not Path(init).is_file():
        raise FileNotFoundError(
            f"init checkpoint {init} does not exist; pass the encoder.pt of a pretrain run "
            "or the model.pt of a finetune run"
        )


def lock_run(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for the life of this process.

    Two writers on one run folder (a second workflow on the same results, or a job that outlived
    its controller) would interleave checkpoints and metrics. ``flock`` is released by the kernel
    when the holder dies, even by SIGKILL, so a crashed run never blocks its own restart."""
    key = out.resolve()
    if key in _RUN_LOCKS:
        return
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunInUseError(
            f"{out} is being run by another live process (pid {holder}); wait for it to end or "
            "stop it, then restart this command (it resumes from the checkpoint)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _RUN_LOCKS[key] = fd


@dataclass(frozen=True)
class RunRecord:
    """What a stage's run folder holds: its resolved ``config`` (the stage's keys), the
    ``derived`` values, the final ``metrics`` (None until the run finished), the MLflow run id
    and the weights file downstream stages and analyses read."""

    path: Path
    stage: str
    config: dict[str, Any]
    derived: dict[str, Any]
    metrics: dict[str, Any] | None
    mlflow_run_id: str | None

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def config_hash(self) -> str | None:
        return self.derived.get("config_hash")

    @property
    def weights(self) -> Path:
        """``encoder.pt`` of a pretrain run, ``model.pt`` of the others."""
        return self.path / ("encoder.pt" if self.stage == "pretrain" else "model.pt")

    @property
    def init(self) -> dict[str, Any] | None:
        """The report of the checkpoint that initialised the run (None: from scratch)."""
        return self.derived.get("init")

    @property
    def preset(self) -> str | None:
        """The pre-training preset behind the run's weights (its own, or its init's)."""
        if self.stage == "pretrain":
            return self.config["model"]["preset"]
        return self.init["meta"].get("preset") if self.init else None


def read_run(path: str | Path) -> RunRecord:
    """The :class:`RunRecord` of run folder ``path``; a ``ConfigError`` when it holds no
    ``resolved_config.yaml``."""
    path = Path(path)
    resolved = path / "resolved_config.yaml"
    if not resolved.is_file():
        raise ConfigError(f"{path}: not a run folder of an a2mim stage (no resolved_config.yaml)")
    data = dict(yaml.safe_load(resolved.read_text()) or {})
    stage = str(data.pop("stage", "unknown"))
    derived = dict(data.pop("derived", None) or {})
    metrics_path, run_id_path = path / "metrics.json", path / RUN_ID_FILE
    return RunRecord(
        path=path,
        stage=stage,
        config=data,
        derived=derived,
        metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        mlflow_run_id=run_id_path.read_text().strip() if run_id_path.is_file() else None,
    )


def finished_hash(out: Path) -> str | None:
    """The config hash of the finished run in ``out``, or None: a folder without a checkpoint
    may still hold a run's results, which another config must not overwrite."""
    if not (out / "resolved_config.yaml").is_file():
        return None
    record = read_run(out)
    return record.config_hash if record.finished else None


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
    if rank == 0:
        lock_run(out)
    ckpt_path = out / "checkpoint.pt"
    state = checkpoint.load(ckpt_path) if ckpt_path.exists() else None
    recorded = state["config_hash"] if state is not None else finished_hash(out)
    if recorded is not None and recorded != derived["config_hash"]:
        raise ConfigError(
            f"{out} holds a run with a different config (hash {recorded} vs "
            f"{derived['config_hash']}); use another --out, or delete the folder {out} to "
            f"start this config over there"
        )
    if state is not None and rank == 0:
        print(f"{stage}: resuming from {ckpt_path} at step {state['step']}", flush=True)
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
