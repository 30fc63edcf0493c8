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

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from a2mim import atomic
from a2mim.analysis.fourier import (
    block_features,
    default_block_names,
    feature_variance,
    high_frequency_delta,
)
from a2mim.analysis.interactions import (
    DEFAULT_ORDER_RATIOS,
    InteractionResult,
    InteractionSampling,
    interaction_strength,
    interaction_strength_reference_batched,
)
from a2mim.analysis.occlusion import DEFAULT_OCCLUSION_RATIOS, occlusion_accuracy
from a2mim.analysis.reconstruction import reconstruct, save_figure, save_reconstruction_rows
from a2mim.config import ConfigError, from_dict
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.mim import MaskedImageModel, MIMConfig
from a2mim.tracking import RUN_ID_FILE
from a2mim.train import checkpoint
from a2mim.train.classify import load_classifier
from a2mim.train.distributed import resolve_device
from a2mim.train.encoder import create_classifier, file_sha256
from a2mim.train.rundir import config_hash, open_run, read_run
from a2mim.train.sampling import mix_seed

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

Figure = Literal["figure1", "figure3", "figure5"]
FIGURES: tuple[str, ...] = ("figure1", "figure3", "figure5")
RANDOM = "random"
"""The PATH that stands for a random-init model (figures 1 and 3). timm initialises the last
BatchNorm of every residual block to zero, so a random-init ResNet's residual branches are off:
its output depends on a few pixels only, and its interactions between neighbours are mostly 0."""

_NAME_RE = re.compile(r"\w[\w.-]*")  # band names: valid in MLflow keys
_ACCEPTED: dict[str, tuple[str, ...]] = {
    "figure1": ("finetune", "linprobe"),
    "figure3": ("pretrain", "finetune", "linprobe"),
    "figure5": ("pretrain",),
}
_CSV_COLUMNS = ("model", "panel", "x", "y", "detail")


# ---------------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs to know about one ``--model LABEL=PATH``.

    ``stage`` is the producing stage (``pretrain``, ``finetune``, ``linprobe``) or ``random``;
    ``method`` the pre-training method (``a2mim``, ``simmim``, ``scratch``, ``random``);
    ``weights`` the file the model is loaded from and ``sha256`` its digest.
    """

    label: str
    path: str
    stage: str
    method: str
    preset: str | None
    backbone: str
    backbone_kwargs: dict[str, Any]
    img_size: int
    crop_pct: float
    num_classes: int | None
    classes: tuple[str, ...] | None
    global_pool: str | None
    weights: str | None
    sha256: str | None

    @property
    def key(self) -> str:
        """The label as a metric-key prefix and folder name (:func:`metric_key`)."""
        return metric_key(self.label)

    @property
    def legend(self) -> str:
        """Method and checkpoint: ``A2MIM: a2mim_resnet18 + finetune [ft_a2mim]``."""
        if self.stage == RANDOM:
            return f"{self.label}: random init {self.backbone}"
        what = self.preset or {"finetune": "scratch", "linprobe": "random features"}[self.stage]
        if self.stage != "pretrain":
            what += f" + {self.stage}"
        return f"{self.label}: {what} [{Path(self.path).name}]"


def _need(figure: str) -> str:
    return {
        "figure1": "finished finetune (or linprobe) run folders holding model.pt",
        "figure3": "finished pretrain (encoder.pt) or finetune/linprobe (model.pt) run folders",
        "figure5": "finished pretrain run folders holding checkpoint.pt (decoder, mask token)",
    }[figure]


def inspect_run(label: str, path_text: str, figure: str, crop_pct: float | None) -> RunInfo:
    """Check that ``path_text`` is a finished run that ``figure`` can use, and describe it.

    Raises FileNotFoundError for a missing folder and ConfigError for a run of the wrong kind
    or an unfinished one; both messages name the label, the folder and what to pass instead.
    """
    where = f"--model {label}={path_text}"
    path = Path(path_text)
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such run folder; {figure} takes {_need(figure)}")
    if not path.is_dir():
        raise ConfigError(f"{where}: is a file; pass the run folder that holds it ({path.parent})")
    if not (path / "resolved_config.yaml").is_file():
        raise ConfigError(
            f"{where}: not a run folder of an a2mim stage (no resolved_config.yaml); "
            f"{figure} takes {_need(figure)}"
        )
    record = read_run(path)
    stage = record.stage
    if stage not in _ACCEPTED[figure]:
        hint = ""
        if stage == "pretrain" and figure == "figure1":
            hint = f"; fine-tune it first: a2mim finetune --config ... --init {path}/encoder.pt"
        raise ConfigError(f"{where}: is a {stage} run; {figure} takes {_need(figure)}{hint}")
    weights = record.weights
    if stage == "pretrain" and figure == "figure5":
        weights = path / "checkpoint.pt"
    if not weights.is_file() or not record.finished:
        raise ConfigError(
            f"{where}: the {stage} run has not finished ({weights.name} or metrics.json is "
            "missing); finish it (the same command resumes it) and analyse it then"
        )
    preset = record.preset
    if stage == "pretrain":
        mim = record.derived["mim"]
        return RunInfo(
            label=label,
            path=str(path),
            stage=stage,
            method=preset.split("_")[0],
            preset=preset,
            backbone=mim["backbone"],
            backbone_kwargs=dict(mim["backbone_kwargs"]),
            img_size=int(mim["img_size"]),
            crop_pct=1.0 if crop_pct is None else crop_pct,
            num_classes=None,
            classes=None,
            global_pool=None,
            weights=str(weights),
            sha256=file_sha256(weights),
        )
    meta = checkpoint.load(weights)["meta"]
    return RunInfo(
        label=label,
        path=str(path),
        stage=stage,
        method=preset.split("_")[0] if preset else "scratch",
        preset=preset,
        backbone=meta["backbone"],
        backbone_kwargs=dict(meta["backbone_kwargs"]),
        img_size=int(meta.get("test_img_size") or meta["img_size"]),
        crop_pct=float(meta["test_crop_pct"]) if crop_pct is None else crop_pct,
        num_classes=int(meta["num_classes"]),
        classes=tuple(meta["classes"]),
        global_pool=meta.get("global_pool"),
        weights=str(weights),
        sha256=file_sha256(weights),
    )


def _inspect_all(cfg: AnalyzeConfig) -> list[RunInfo]:
    """Every model of ``cfg``, ``random`` ones shaped like the first real run."""
    real = {
        ref.label: inspect_run(ref.label, ref.path, cfg.figure, cfg.data.crop_pct)
        for ref in cfg.models
        if ref.path != RANDOM
    }
    template = next(iter(real.values()))
    return [
        real[ref.label]
        if ref.path != RANDOM
        else replace(
            template,
            label=ref.label,
            path=RANDOM,
            stage=RANDOM,
            method=RANDOM,
            preset=None,
            weights=None,
            sha256=None,
        )
        for ref in cfg.models
    ]


def build_classifier(info: RunInfo, seed: int) -> nn.Module:
    """The classifier of a finetune/linprobe run, or a random-init one (seeded) like it."""
    if info.stage == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, 5))
            model = create_classifier(
                info.backbone,
                info.num_classes or 0,
                info.img_size,
                info.backbone_kwargs,
                global_pool=info.global_pool,
            )
        return model.eval()
    return load_classifier(info.weights)[0]


def build_encoder(info: RunInfo, seed: int) -> nn.Module:
    """The network whose blocks Fig. 3 reads: a pretrain run's encoder (timm model without a
    head, loaded strictly), a classifier run's classifier, or a random-init one."""
    if info.stage != "pretrain":
        return build_classifier(info, seed)
    model = create_classifier(info.backbone, 0, info.img_size, info.backbone_kwargs)
    state = checkpoint.load(info.weights)["state_dict"]
    checkpoint.load_encoder_strict(model, state, info.weights)
    return model.eval()


def build_mim_model(info: RunInfo) -> MaskedImageModel:
    """The full masked image model of a pretrain run (encoder, mask token, decoder) as it was
    at the run's end, from its resolved ``MIMConfig`` and ``checkpoint.pt``."""
    mim = read_run(info.path).derived["mim"]
    mim_cfg = from_dict(MIMConfig, mim, f"{info.path}: derived.mim")
    model = MaskedImageModel(mim_cfg)
    model.load_state_dict(checkpoint.load(info.weights)["model"], strict=True)
    return model.eval()


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


def _csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for row in rows:
        writer.writerow([row.model, row.panel, repr(float(row.x)), repr(float(row.y)), row.detail])
    return buffer.getvalue()


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
    runs = _inspect_all(cfg)  # every folder is checked before anything is written
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
        atomic.write_text(out / f"{cfg.figure}.csv", _csv_text(result.rows))
        if result.notes:
            tracker.set_tags(result.notes)
        metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(v)}
        tracker.log_metrics(metrics, step=0)
        for path in [*figure_paths, out / f"{cfg.figure}.csv"]:
            tracker.log_artifact(path)
        atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        tracker.log_artifact(out / "metrics.json")
    return metrics
