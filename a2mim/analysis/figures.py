"""Figures 1, 3 and 5 of the paper from the runs of an analysis: their numbers, curves and CSV."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim.analysis.config import AnalyzeConfig, DataConfig
from a2mim.analysis.fourier import (
    block_features,
    default_block_names,
    feature_variance,
    high_frequency_delta,
)
from a2mim.analysis.interactions import (
    InteractionResult,
    interaction_strength,
    interaction_strength_reference_batched,
)
from a2mim.analysis.occlusion import occlusion_accuracy
from a2mim.analysis.reconstruction import reconstruct, save_figure
from a2mim.analysis.runs import RunInfo, build_classifier, build_encoder, build_mim_model
from a2mim.config import ConfigError
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.train.sampling import mix_seed

_CSV_COLUMNS = ("model", "panel", "x", "y", "detail")


# ----------------------------------------------------------------------------- the images


def pick_indices(n_total: int, n_wanted: int | None, what: str) -> list[int]:
    """``n_wanted`` indices evenly spaced over ``range(n_total)`` (all when None); an error if
    the split holds fewer images than asked for."""
    if n_wanted is None:
        return list(range(n_total))
    if n_wanted > n_total:
        raise ConfigError(
            f"{what} = {n_wanted}, but the split holds only {n_total} images; lower it"
        )
    return [k * n_total // n_wanted for k in range(n_wanted)]


class _Images:
    """The analysis split, read once, viewed through each run's evaluation transform."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.dataset = ImageFolderDataset(
            cfg.root, cfg.split, on_corrupt="skip" if cfg.skip_corrupt else "error"
        )

    def view(self, info: RunInfo) -> ImageFolderDataset:
        view = copy.copy(self.dataset)
        view.transform = eval_transform(info.img_size, info.crop_pct)
        return view

    def loader(self, info: RunInfo, indices: Sequence[int]) -> DataLoader:
        return DataLoader(
            Subset(self.view(info), list(indices)),
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
        )

    def tensors(self, info: RunInfo, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.view(info)
        items = [view[i] for i in indices]
        return torch.stack([img for img, _ in items]), torch.tensor([t for _, t in items])

    def check_classes(self, info: RunInfo) -> None:
        if info.classes is not None and tuple(self.dataset.classes) != info.classes:
            raise ConfigError(
                f"--model {info.label}: the classifier was trained on classes "
                f"{list(info.classes)[:5]}... ({len(info.classes)}), but {self.cfg.root}/"
                f"{self.cfg.split} has {list(self.dataset.classes)[:5]}... "
                f"({len(self.dataset.classes)}); analyse it on the data it was trained for"
            )


class Row(NamedTuple):
    """One number behind a curve: ``model`` label, ``panel``, ``x``, ``y``, free ``detail``."""

    model: str
    panel: str
    x: float
    y: float
    detail: str = ""


class FigureResult(NamedTuple):
    rows: list[Row]
    metrics: dict[str, float]
    notes: dict[str, str]


# ----------------------------------------------------------------------------- figure 1


def _occlusion_auc(acc: dict[float, float]) -> float:
    """Trapezoid area under top-1 vs ratio, divided by the ratio range (percent)."""
    ratios = sorted(acc)
    if len(ratios) == 1:
        return acc[ratios[0]]
    area = sum((b - a) * (acc[a] + acc[b]) / 2 for a, b in itertools.pairwise(ratios))
    return area / (ratios[-1] - ratios[0])


def _interaction_state(out: Path, info: RunInfo, key_data: dict[str, Any]) -> Path:
    """The state file of one model's interaction estimate; other (stale) files of the same
    label are removed."""
    key_text = json.dumps({**key_data, "sha256": info.sha256, "stage": info.stage}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    folder = out / "state" / info.key
    path = folder / f"interactions_{key}.json"
    if folder.is_dir():
        for stale in folder.glob("interactions_*.json"):
            if stale != path:
                stale.unlink()
    return path


def _check_figure1_input(cfg: AnalyzeConfig, info: RunInfo, images: _Images) -> None:
    """Refuse, before any compute, inputs that patches or players do not tile."""
    images.check_classes(info)
    for name, divisor in (
        ("occlusion.patch_size", cfg.occlusion.patch_size),
        ("interactions.grid", cfg.interactions.grid),
    ):
        if info.img_size % divisor:
            raise ConfigError(
                f"--model {info.label}: its {info.img_size} px inputs are not divisible by "
                f"{name}={divisor}; choose one that divides the image size"
            )


def _interactions(
    cfg: AnalyzeConfig,
    info: RunInfo,
    model: nn.Module,
    images: _Images,
    indices: list[int],
    out: Path,
) -> InteractionResult:
    """The interaction estimate of one model, resumable through its state file in ``out``."""
    inter = cfg.interactions
    sampling = inter.sampling(cfg.seed)
    imgs, labels = images.tensors(info, indices)
    key_data = {
        "sampling": asdict(sampling),
        "implementation": inter.implementation,
        "chunk": inter.chunk_size,
        "bf16": inter.bf16,
        "data": [cfg.data.root, cfg.data.split, indices, info.img_size, info.crop_pct],
    }
    state_path = _interaction_state(out, info, key_data)
    if inter.implementation == "reference":
        return interaction_strength_reference_batched(
            model, imgs, labels, sampling, chunk_size=inter.chunk_size, state_path=state_path
        )
    return interaction_strength(
        model,
        imgs,
        labels,
        sampling,
        chunk_size=inter.chunk_size,
        state_path=state_path,
        bf16=inter.bf16,
    )


def _figure1_numbers(
    cfg: AnalyzeConfig, info: RunInfo, acc: dict[float, float], result: InteractionResult
) -> tuple[list[Row], dict[str, float]]:
    """CSV rows (top-1 per ratio; J(m) and I(m) per order, x = m / n) and headline metrics."""
    label, key = info.label, info.key
    rows = [Row(label, "occlusion_top1", r, a) for r, a in acc.items()]
    n_players = cfg.interactions.grid**2
    strength, relative = result.strength_o.tolist(), result.relative_strength_o.tolist()
    for m, i_m, j_m in zip(result.orders, strength, relative, strict=True):
        rows.append(Row(label, "interaction_J", m / n_players, j_m, f"m={m}"))
        rows.append(Row(label, "interaction_I", m / n_players, i_m, f"m={m}"))
    metrics = {f"{key}/top1": acc[0.0]} if 0.0 in acc else {}
    metrics[f"{key}/occlusion_auc"] = _occlusion_auc(acc)
    for band, (lo, hi) in cfg.interactions.bands.items():
        ratios = result.order_ratios
        inside = [j for r, j in zip(ratios, relative, strict=True) if lo <= r <= hi]
        if inside:
            metrics[f"{key}/J_{band}"] = sum(inside) / len(inside)
    return rows, metrics


def figure1(
    cfg: AnalyzeConfig, runs: list[RunInfo], out: Path, device: torch.device, say: Callable
) -> FigureResult:
    """Occlusion robustness and multi-order interactions of every classifier."""
    images = _Images(cfg.data)
    n_total = len(images.dataset)
    occ_idx = pick_indices(n_total, cfg.occlusion.num_images, "occlusion.num_images")
    int_idx = pick_indices(n_total, cfg.interactions.num_images, "interactions.num_images")
    for info in runs:
        _check_figure1_input(cfg, info, images)
    rows: list[Row] = []
    metrics: dict[str, float] = {}
    for info in runs:
        model = build_classifier(info, cfg.seed).to(device)
        t0 = time.perf_counter()
        acc = occlusion_accuracy(
            model,
            images.loader(info, occ_idx),
            ratios=cfg.occlusion.ratios,
            patch_size=cfg.occlusion.patch_size,
            per_image=cfg.occlusion.per_image,
            seed=cfg.seed,
            device=device,
        )
        t1 = time.perf_counter()
        result = _interactions(cfg, info, model, images, int_idx, out)
        say(
            f"figure1 {info.label}: occlusion {t1 - t0:.1f} s ({len(occ_idx)} images), "
            f"interactions {time.perf_counter() - t1:.1f} s ({result.n_forwards} forwards)"
        )
        model_rows, model_metrics = _figure1_numbers(cfg, info, acc, result)
        rows += model_rows
        metrics.update(model_metrics)
    return FigureResult(rows, metrics, {})


# ----------------------------------------------------------------------------- figure 3


def _fourier_sums(
    model: nn.Module, names: Sequence[str], loader: DataLoader, device: torch.device
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per block: ``Delta log A(pi)`` and variance over all images of ``loader``.

    Both are means over images (and channels) of per-image quantities, so the batch-size
    weighted mean of per-batch results equals the result on all images at once. Blocks without
    a square map of at least 2 x 2 are returned in the second dict with the reason."""
    sums = {name: [0.0, 0.0] for name in names}
    skipped: dict[str, str] = {}
    n_seen = 0
    for img_bchw, _ in loader:
        feats = block_features(model, names, img_bchw.to(device))
        for name, feat_bchw in zip(names, feats, strict=True):
            h, w = feat_bchw.shape[-2:]
            if h != w or h < 2:
                skipped[name] = f"{h}x{w} map"
                continue
            sums[name][0] += len(img_bchw) * high_frequency_delta(feat_bchw)
            sums[name][1] += len(img_bchw) * feature_variance(feat_bchw)
        n_seen += len(img_bchw)
    kept = {n: (s[0] / n_seen, s[1] / n_seen) for n, s in sums.items() if n not in skipped}
    return kept, skipped


def figure3(
    cfg: AnalyzeConfig, runs: list[RunInfo], out: Path, device: torch.device, say: Callable
) -> FigureResult:
    """High-frequency log amplitude and feature variance of every block of every encoder."""
    images = _Images(cfg.data)
    idx = pick_indices(len(images.dataset), cfg.fourier.num_images, "fourier.num_images")
    rows: list[Row] = []
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    for info in runs:
        t0 = time.perf_counter()
        model = build_encoder(info, cfg.seed).to(device)
        names = list(cfg.fourier.blocks or default_block_names(model))
        kept, skipped = _fourier_sums(model, names, images.loader(info, idx), device)
        if not kept:
            raise ConfigError(
                f"--model {info.label}: no block of {info.backbone} gives a map of at least "
                f"2x2 at {info.img_size} px ({skipped}); analyse larger images"
            )
        last = max(len(names) - 1, 1)
        for depth, name in enumerate(names):
            if name in kept:
                delta, variance = kept[name]
                rows.append(Row(info.label, "high_freq_delta_log_amp", depth / last, delta, name))
                rows.append(Row(info.label, "feature_variance", depth / last, variance, name))
        deltas = [d for d, _ in kept.values()]
        variances = [v for _, v in kept.values()]
        metrics[f"{info.key}/high_freq_delta_mean"] = sum(deltas) / len(deltas)
        metrics[f"{info.key}/high_freq_delta_last"] = deltas[-1]
        metrics[f"{info.key}/variance_mean"] = sum(variances) / len(variances)
        metrics[f"{info.key}/variance_last"] = variances[-1]
        if skipped:
            notes[info.label] = ", ".join(f"{n} ({why})" for n, why in skipped.items())
        say(
            f"figure3 {info.label}: {len(kept)} blocks in {time.perf_counter() - t0:.1f} s"
            + (f", skipped {notes[info.label]}" if skipped else "")
        )
    return FigureResult(rows, metrics, {"fourier_skipped": json.dumps(notes)} if notes else {})


# ----------------------------------------------------------------------------- figure 5


def figure5(
    cfg: AnalyzeConfig, runs: list[RunInfo], out: Path, device: torch.device, say: Callable
) -> tuple[FigureResult, list[tuple[str, dict[str, torch.Tensor]]], list[str]]:
    """Reconstructions of the same images under the same masks by every pre-trained model."""
    images = _Images(cfg.data)
    n_total = len(images.dataset)
    rec = cfg.reconstruction
    if rec.image_indices is not None:
        idx = list(rec.image_indices)
        if max(idx) >= n_total:
            raise ConfigError(
                f"reconstruction.image_indices {idx}: the split holds {n_total} images "
                f"(indices 0..{n_total - 1})"
            )
    else:
        idx = pick_indices(n_total, rec.num_images, "reconstruction.num_images")
    rows: list[Row] = []
    metrics: dict[str, float] = {}
    panel_rows = []
    for info in runs:
        model = build_mim_model(info).to(device)
        imgs, _ = images.tensors(info, idx)
        generator = torch.Generator().manual_seed(mix_seed(cfg.seed, 3))
        mask_bgg = model.masker(len(idx), generator=generator)
        result = reconstruct(model, imgs, mask_bgg)
        panel_rows.append((info.legend, result.panels))
        for index, l1 in zip(idx, result.masked_l1_b.tolist(), strict=True):
            rows.append(
                Row(info.label, "masked_l1", index, l1, Path(images.dataset.samples[index][0]).name)
            )
        metrics[f"{info.key}/recon_loss"] = result.loss
        metrics[f"{info.key}/masked_l1"] = float(result.masked_l1_b.mean())
        say(f"figure5 {info.label}: loss {result.loss:.4f} on {len(idx)} images")
    names = [f"#{i}" for i in idx]
    return FigureResult(rows, metrics, {}), panel_rows, names


# ----------------------------------------------------------------------------- outputs


_LINE_PANELS: dict[str, list[tuple[str, str, str, str]]] = {
    # (panel, title, x label, y label)
    "figure1": [
        ("occlusion_top1", "Occlusion robustness", "occlusion ratio r", "top-1 accuracy (%)"),
        ("interaction_J", "Multi-order interaction strength", "order m / n", "J(m)"),
    ],
    "figure3": [
        (
            "high_freq_delta_log_amp",
            "Relative log amplitude of high frequency",
            "normalised depth",
            "Δ log amplitude at π",
        ),
        ("feature_variance", "Feature map variance", "normalised depth", "variance"),
    ],
}


def plot_lines(
    figure: str, rows: Sequence[Row], legends: dict[str, str], title: str, paths: Sequence[Path]
) -> None:
    """One subplot per panel of ``figure``, one curve per model (legend: method + checkpoint),
    saved to every path in ``paths`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = _LINE_PANELS[figure]
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.0), squeeze=False)
    for ax, (panel, panel_title, x_label, y_label) in zip(axes[0], specs, strict=True):
        for label, legend in legends.items():
            points = sorted((r.x, r.y) for r in rows if r.model == label and r.panel == panel)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=legend)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        for path in paths:
            save_figure(fig, path)
    finally:
        plt.close(fig)


def csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for row in rows:
        writer.writerow([row.model, row.panel, repr(float(row.x)), repr(float(row.y)), row.detail])
    return buffer.getvalue()
