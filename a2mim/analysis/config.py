"""The analysis stage's config: which figure, of which runs, on which images, and each part's settings."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from a2mim.analysis.interactions import DEFAULT_ORDER_RATIOS, InteractionSampling
from a2mim.analysis.occlusion import DEFAULT_OCCLUSION_RATIOS
from a2mim.config import ConfigError, from_dict

Figure = Literal["figure1", "figure3", "figure5"]
FIGURES: tuple[str, ...] = ("figure1", "figure3", "figure5")
RANDOM = "random"
"""The PATH that stands for a random-init model (figures 1 and 3). timm initialises the last
BatchNorm of every residual block to zero, so a random-init ResNet's residual branches are off:
its output depends on a few pixels only, and its interactions between neighbours are mostly 0."""

_NAME_RE = re.compile(r"\w[\w.-]*")  # band names: valid in MLflow keys


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from. ``crop_pct: null`` uses each run's own evaluation crop
    (classifier runs) or 1.0 (pre-training runs); ``batch_size`` is the forward batch of the
    occlusion and Fourier passes (the reference occlusion tool's per-batch patch sets depend
    on it)."""

    root: str = "data/imagenet"
    split: str = "val"
    crop_pct: float | None = None
    skip_corrupt: bool = False
    num_workers: int = 0
    batch_size: int = 64


@dataclass(frozen=True)
class OcclusionConfig:
    """Fig. 1 (a-d): ``round(n_patches * r)`` random patches of ``patch_size`` px set to the mean
    colour; ``per_image`` draws a patch set per image (the reference tool: one per batch).
    ``num_images: null`` takes the whole split."""

    ratios: tuple[float, ...] = DEFAULT_OCCLUSION_RATIOS
    patch_size: int = 16
    per_image: bool = True
    num_images: int | None = None


@dataclass(frozen=True)
class InteractionConfig:
    """Fig. 1 (e, f): ``grid x grid`` players, orders ``m = int((n - 2) r)``, ``n_pairs``
    neighbour pairs (within ``radius`` cells) and ``n_contexts`` contexts per image (see
    ``a2mim.analysis.interactions``). ``implementation``: ``fast`` (deduplicated forwards,
    folded batch-norm) or ``reference`` (the baseline, four forwards per context).

    ``bands`` name ranges of the order ratio ``r`` whose mean ``J(m)`` is a headline metric
    (``J_low``, ``J_mid``, ``J_high``)."""

    num_images: int = 50
    grid: int = 14
    order_ratios: tuple[float, ...] = DEFAULT_ORDER_RATIOS
    n_pairs: int = 50
    n_contexts: int = 50
    radius: int = 2
    shared_contexts: bool = True
    implementation: Literal["fast", "reference"] = "fast"
    chunk_size: int = 256
    bf16: bool = False
    bands: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"low": (0.0, 0.1), "mid": (0.3, 0.7), "high": (0.9, 1.0)}
    )

    def sampling(self, seed: int) -> InteractionSampling:
        return InteractionSampling(
            grid=self.grid,
            order_ratios=self.order_ratios,
            n_pairs=self.n_pairs,
            n_contexts=self.n_contexts,
            radius=self.radius,
            seed=seed,
            shared_contexts=self.shared_contexts,
        )


@dataclass(frozen=True)
class FourierConfig:
    """Fig. 3: the outputs of ``blocks`` (module names; ``null``: the stem and every residual
    block of a ResNet, every block of a ViT) on ``num_images`` images. Blocks whose output is
    not a square map of at least 2 x 2 (a ResNet's last stage at 32 px) have no spectrum and no
    spatial variance: they are left out of the figure and named in the run's tag
    ``fourier_skipped``; the depth axis still counts them."""

    num_images: int = 128
    blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReconstructionConfig:
    """Fig. 5: ``image_indices`` (positions in the split's sorted samples) or, when null,
    ``num_images`` evenly spaced images."""

    num_images: int = 4
    image_indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelRef:
    """One curve / row: its legend ``label`` and its run folder ``path`` (or ``random``)."""

    label: str
    path: str


@dataclass(frozen=True)
class AnalyzeConfig:
    """One figure of the paper from ``models``, in legend order."""

    figure: Figure | None = None
    models: tuple[ModelRef, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    interactions: InteractionConfig = field(default_factory=InteractionConfig)
    fourier: FourierConfig = field(default_factory=FourierConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    scale: Literal["tiny", "small", "paper"] = "paper"
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    track: bool = True  # MLflow (a2mim.tracking)
    tracking_uri: str | None = None  # default: sqlite under the results folder, or env
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (not hashed)


def parse_models(items: Iterable[str]) -> list[dict[str, str]]:
    """``["A2MIM=runs/ft_a2mim", "random=random"]`` -> ``[{"label", "path"}, ...]`` (CLI
    ``--model``), in the given order; an item without ``LABEL=PATH`` is an error."""
    models = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path:
            raise ConfigError(
                f"--model {item!r}: expected LABEL=PATH, e.g. --model A2MIM=results/runs/ft_a2mim"
            )
        models.append({"label": label, "path": path})
    return models


def metric_key(label: str) -> str:
    """``label`` as a name MLflow accepts (metric keys, params) and as a folder name: characters
    other than letters, digits, ``_ - . space`` become ``_``; a leading ``.`` too."""
    key = re.sub(r"[^\w.\- ]", "_", label)
    return "_" + key[1:] if key.startswith(".") else key


def _check_models(cfg: AnalyzeConfig, where: str) -> None:
    if not cfg.models:
        raise ConfigError(f"{where}: no models: pass --model LABEL=PATH (one per curve or row)")
    keys: dict[str, str] = {}
    for ref in cfg.models:
        if not ref.label.strip() or "," in ref.label or not ref.label.isprintable():
            raise ConfigError(
                f"{where}: model label {ref.label!r}: use printable text without commas"
            )
        key = metric_key(ref.label)
        if key in keys:
            what = "given twice" if keys[key] == ref.label else f"the same key as {keys[key]!r}"
            raise ConfigError(
                f"{where}: model label {ref.label!r} is {what} (metric prefix {key!r}); every "
                "curve needs its own label"
            )
        keys[key] = ref.label
        if ref.path == RANDOM and cfg.figure == "figure5":
            raise ConfigError(
                f"{where}: --model {ref.label}=random: figure5 needs a trained decoder; pass a "
                "pretrain run folder"
            )
    if all(ref.path == RANDOM for ref in cfg.models):
        raise ConfigError(
            f"{where}: every model is 'random'; a random model copies the architecture of a "
            "real run, so pass at least one run folder"
        )


def load_config(data: dict[str, Any], where: str = "config") -> AnalyzeConfig:
    """Validate a mapping into an ``AnalyzeConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(AnalyzeConfig, data, where)
    if cfg.figure is None:
        raise ConfigError(f"{where}: no figure: run `a2mim analyze {{{','.join(FIGURES)}}} ...`")
    _check_models(cfg, where)
    _check_positive(cfg, where)
    if any(not 0.0 <= r <= 1.0 for r in cfg.occlusion.ratios) or not cfg.occlusion.ratios:
        raise ConfigError(f"{where}: occlusion.ratios must be ratios in [0, 1]")
    try:
        cfg.interactions.sampling(cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"{where}: interactions: {exc}") from None
    for band, (lo, hi) in cfg.interactions.bands.items():
        if not 0.0 <= lo <= hi <= 1.0 or not _NAME_RE.fullmatch(band):
            raise ConfigError(
                f"{where}: interactions.bands.{band}: need a name of letters/digits and "
                f"0 <= lo <= hi <= 1, got {[lo, hi]}"
            )
    if cfg.data.crop_pct is not None and not 0.0 < cfg.data.crop_pct <= 1.0:
        raise ConfigError(f"{where}: data.crop_pct must be in (0, 1] or null")
    indices = cfg.reconstruction.image_indices
    if indices is not None and (not indices or min(indices) < 0):
        raise ConfigError(f"{where}: reconstruction.image_indices must be indices >= 0")
    return cfg


def _check_positive(cfg: AnalyzeConfig, where: str) -> None:
    counts = {
        "data.batch_size": cfg.data.batch_size,
        "occlusion.patch_size": cfg.occlusion.patch_size,
        "occlusion.num_images": cfg.occlusion.num_images,
        "interactions.num_images": cfg.interactions.num_images,
        "interactions.chunk_size": cfg.interactions.chunk_size,
        "fourier.num_images": cfg.fourier.num_images,
        "reconstruction.num_images": cfg.reconstruction.num_images,
    }
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {value}")
