"""Stage ``analyze``: the paper's analysis figures from finished runs (Sec. 3; Figs. 1, 3, 5).

``run(cfg, out_dir) -> metrics``. ``cfg.figure`` picks the figure and ``cfg.models`` lists
``{label, path}``: the curve / row name (any text; the legend adds method and checkpoint) and a
run folder:

``figure1``  occlusion robustness (top-1 vs occlusion ratio) and multi-order interaction
             strength ``J(m)`` vs ``m / n``, of classifiers: ``finetune`` (or ``linprobe``) run
             folders (``model.pt``), or ``random`` (a random-init classifier shaped like the
             first real model, seeded by ``seed``).
``figure3``  high-frequency relative log amplitude ``Delta log A(pi)`` and feature-map variance
             of every block's output vs normalised depth, of encoders: ``pretrain`` run folders
             (``encoder.pt``), classifier run folders, or ``random``.
``figure5``  reconstructions (input / masked input / prediction / prediction pasted into the
             visible pixels) of chosen validation images, one row per ``pretrain`` run folder
             (``checkpoint.pt`` holds the decoder and mask token; ``resolved_config.yaml`` the
             model); every model sees the same masks (drawn from ``seed``; models with
             the same mask grid get identical masks).

Images come from ``data.root/data.split`` through the evaluation transform of the stages
(resize to ``floor(size / crop_pct)``, centre crop, normalise) at each run's own size and crop
(a classifier run's ``test_img_size`` / ``test_crop_pct``; a pre-training run's ``img_size``
with ``crop_pct`` 1, as the pre-training figures); ``data.crop_pct`` overrides the crop. Each
part takes ``num_images`` images evenly spaced over the split's sorted samples (ImageFolder sorts
by class, so classes are covered in proportion).

Outputs in ``out_dir``, each written atomically: ``<figure>.png`` and ``.svg``, ``<figure>.csv``
(the numbers behind every curve, long format: ``model, panel, x, y, detail``),
``resolved_config.yaml`` (with ``derived``: each model's run, method, checksum and legend),
``state/<key>/interactions_<hash>.json`` (figure 1: the interaction estimate's per-image results;
a restarted run skips the images already done; ``<hash>`` names the checkpoint, images and
sampling, so a changed checkpoint or config starts afresh and its stale file is removed), and
``metrics.json`` LAST (headline numbers per model, ``<key>/<name>`` with ``key`` the label with
characters MLflow does not take in names replaced by ``_``). One MLflow run per
folder (stage ``analysis``, tags ``figure``, ``models``, ``scale``) holds the headline metrics
and the PNG / SVG / CSV as artifacts; the same command on the same folder continues it, a
changed config or checkpoint starts a new one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from a2mim import atomic
from a2mim.analysis.config import (
    FIGURES,
    AnalyzeConfig,
    DataConfig,
    FourierConfig,
    InteractionConfig,
    ModelRef,
    OcclusionConfig,
    ReconstructionConfig,
    load_config,
    metric_key,
    parse_models,
)
from a2mim.analysis.figures import csv_text, figure1, figure3, figure5, pick_indices, plot_lines
from a2mim.analysis.reconstruction import save_reconstruction_rows
from a2mim.analysis.runs import RunInfo, inspect_all, inspect_run
from a2mim.tracking import RUN_ID_FILE
from a2mim.train.distributed import resolve_device
from a2mim.train.rundir import config_hash, open_run, read_run

__all__ = [
    "FIGURES",
    "AnalyzeConfig",
    "DataConfig",
    "FourierConfig",
    "InteractionConfig",
    "ModelRef",
    "OcclusionConfig",
    "ReconstructionConfig",
    "RunInfo",
    "inspect_run",
    "load_config",
    "metric_key",
    "parse_models",
    "pick_indices",
    "run",
]


def _forget_other_analysis(out: Path, derived: dict[str, Any]) -> None:
    """A folder that held an analysis of another config or other checkpoints gets a new MLflow
    run (the old run keeps its record); the same analysis again continues its run."""
    if not (out / "resolved_config.yaml").is_file():
        return
    old = read_run(out).derived
    same = old.get("config_hash") == derived["config_hash"] and old.get("models") == json.loads(
        json.dumps(derived["models"])
    )
    if not same:
        (out / RUN_ID_FILE).unlink(missing_ok=True)


def run(cfg: AnalyzeConfig, out_dir: str | Path) -> dict[str, float]:
    """Make ``cfg.figure`` from ``cfg.models`` in ``out_dir``; returns the headline metrics."""
    runs = inspect_all(cfg)  # every folder is checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # its presence means "this analysis is done"
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False

    def say(text: str) -> None:
        if cfg.progress:
            print(f"[analyze] {text}", file=sys.stderr, flush=True)

    legends = {info.label: info.legend for info in runs}
    derived = {
        "config_hash": config_hash(cfg),
        "models": {
            info.key: {
                "label": info.label,
                "path": info.path,
                "stage": info.stage,
                "method": info.method,
                "preset": info.preset,
                "backbone": info.backbone,
                "img_size": info.img_size,
                "crop_pct": info.crop_pct,
                "weights": info.weights,
                "sha256": info.sha256,
                "legend": info.legend,
            }
            for info in runs
        },
    }
    _forget_other_analysis(out, derived)
    _, tracker = open_run(
        "analysis",
        cfg,
        out,
        derived,
        tags={
            "figure": cfg.figure,
            "models": ",".join(legends),
            "method": ",".join(dict.fromkeys(info.method for info in runs)),
            "backbone": ",".join(dict.fromkeys(info.backbone for info in runs)),
        },
        rank=0,
    )
    with tracker:
        tracker.log_artifact(out / "resolved_config.yaml")
        figure_paths = [out / f"{cfg.figure}.png", out / f"{cfg.figure}.svg"]
        split = f"{cfg.data.root}/{cfg.data.split}"
        if cfg.figure == "figure5":
            result, panel_rows, names = figure5(cfg, runs, out, device, say)
            title = f"Figure 5: reconstructions ({split}, seed {cfg.seed})"
            save_reconstruction_rows(panel_rows, figure_paths, title=title, image_names=names)
        else:
            make = figure1 if cfg.figure == "figure1" else figure3
            result = make(cfg, runs, out, device, say)
            title = {
                "figure1": "Figure 1: occlusion robustness and multi-order interactions",
                "figure3": "Figure 3: Fourier analysis and variance of block outputs",
            }[cfg.figure]
            plot_lines(cfg.figure, result.rows, legends, f"{title} ({split})", figure_paths)
        atomic.write_text(out / f"{cfg.figure}.csv", csv_text(result.rows))
        if result.notes:
            tracker.set_tags(result.notes)
        metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(v)}
        tracker.log_metrics(metrics, step=0)
        for path in [*figure_paths, out / f"{cfg.figure}.csv"]:
            tracker.log_artifact(path)
        atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        tracker.log_artifact(out / "metrics.json")
    return metrics
