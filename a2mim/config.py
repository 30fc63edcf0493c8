"""Frozen, validated configuration objects loaded from YAML, and the types every stage shares.

Every config type is a frozen dataclass. ``from_dict`` checks the keys (an unknown key is an
error that lists the valid ones, with a close match when there is one), the types (``int``,
``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``tuple[...]``, ``dict[str, ...]`` and
nested config dataclasses) and the ranges of numeric fields declared with :func:`bounded`;
``to_dict`` is its inverse, used to save ``resolved_config.yaml``. A float field also takes a
number written as a string (``1e-3``: YAML 1.1, which PyYAML follows, reads it as one).

Shared vocabulary: :class:`RunConfig` holds the run-control keys of every training stage (batch,
accumulation or global batch, amp, seed, device, checkpoint and log cadence, tracking) and
:class:`ImageFolderData` the data keys of the ImageFolder stages; the stages' configs extend them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``lo``/``hi`` bounds (None: open), inclusive or not."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose numeric value (each item of a tuple; None passes) must lie in
    the given bounds; ``from_dict`` refuses others with the key, the value and the range."""
    rng = Range(
        lo=gt if gt is not None else ge,
        hi=lt if lt is not None else le,
        lo_open=gt is not None,
        hi_open=lt is not None,
    )
    return field(default=default, metadata={"range": rng})


def check_range(value: Any, rng: Range, where: str) -> None:
    """A ``ConfigError`` naming ``where``, ``value`` and ``rng`` unless every number is in it."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, int | float) and not isinstance(item, bool) and not rng.admits(item):
            raise ConfigError(
                f"{where}: {value!r} is out of range; allowed: {rng}"
                + (" (or null)" if value is None else "")
            )


def check_ranges(obj: Any, ranges: dict[str, Range], where: str) -> None:
    """:func:`check_range` for fields of a config object declared without :func:`bounded`."""
    for name, rng in ranges.items():
        check_range(getattr(obj, name), rng, f"{where}.{name}")


@dataclass(frozen=True)
class RunConfig:
    """The run-control keys every training stage shares (top-level keys of its YAML).

    ``batch_size`` is per process and micro-step; an optimizer step takes ``accum_steps``
    micro-batches, or, with ``global_batch`` set, ``global_batch / (processes x batch_size)``
    of them (the lr scaling then uses ``global_batch``; it must divide). ``tags`` are extra
    MLflow tags; ``progress``, ``track``, ``tracking_uri`` and ``tags`` do not change results
    (they are not hashed)."""

    scale: Literal["tiny", "small", "paper"] = "paper"
    batch_size: int = bounded(64, ge=1)  # per process and micro-step
    accum_steps: int = bounded(1, ge=1)
    global_batch: int | None = bounded(None, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = bounded(0, ge=0)
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile the trained module (slow to start; off on CPU)
    # Stop after this many optimizer steps, then evaluate and save as at the end; the schedule
    # stays the full run's (smoke and paper-geometry checks). null: the whole run.
    max_steps: int | None = bounded(None, ge=1)
    ckpt_every_steps: int = bounded(500, ge=1)
    log_every_steps: int = bounded(10, ge=1)
    progress: bool = True
    track: bool = True  # MLflow (a2mim.tracking); rank 0 only
    tracking_uri: str | None = None  # default: sqlite under the results folder, or env
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (not hashed)


@dataclass(frozen=True)
class EpochRunConfig(RunConfig):
    """The run-control keys of a stage that trains in epochs over an image folder (pretrain,
    finetune, linprobe): ``channels_last`` puts the model and its input batches in NHWC."""

    epochs: int = bounded(100, ge=1)
    channels_last: bool = False


@dataclass(frozen=True)
class TransferRunConfig(RunConfig):
    """The run-control keys of a stage that starts from a checkpoint: ``init`` is the
    ``encoder.pt`` of a pretrain run or the ``model.pt`` of a finetune run (a supervised
    encoder); null trains from scratch (linprobe, knn: random features)."""

    init: str | None = None


@dataclass(frozen=True)
class OptimBase:
    """The optimiser keys every stage shares. ``lr = base_lr * global_batch / lr_batch_divisor``
    (linear scaling, computed once by :meth:`scaled_lr` and saved with the run)."""

    base_lr: float = bounded(1e-3, gt=0)
    lr_batch_divisor: int = bounded(256, ge=1)
    weight_decay: float = bounded(0.0, ge=0)
    grad_clip: float | None = bounded(None, gt=0)

    def scaled_lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / self.lr_batch_divisor


@dataclass(frozen=True)
class EpochWarmupCosine(OptimBase):
    """The epoch-based schedule of the finetune and linprobe stages (built by
    :func:`a2mim.train.optim.build_epoch_scheduler`): linear warm-up from ``warmup_lr`` over
    ``warmup_epochs``, then either (``schedule: cosine``) a per-iteration cosine to ``min_lr``,
    or (``schedule: step``, mmcv's ``step`` policy, e.g. the MoCo linear probe) the peak lr
    times ``step_gamma`` per milestone of ``step_epochs`` reached. :meth:`check_schedule`
    (run when the stage config loads) refuses a milestone outside the run's epochs."""

    warmup_epochs: float = bounded(0.0, ge=0)
    warmup_lr: float = bounded(0.0, ge=0)
    min_lr: float = bounded(0.0, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    step_epochs: tuple[int, ...] = bounded((), ge=1)
    step_gamma: float = bounded(0.1, gt=0)

    def check_schedule(self, epochs: float, where: str = "config") -> None:
        """A ``ConfigError`` naming the fix for milestones the run of ``epochs`` never reaches
        (at or past the last epoch), out of order, or given to the cosine schedule."""
        steps = list(self.step_epochs)
        if self.schedule == "cosine":
            if steps:
                raise ConfigError(
                    f"{where}: optim.step_epochs {steps} is read only by optim.schedule: step "
                    "(the schedule is cosine); set optim.schedule: step or drop step_epochs"
                )
            return
        late = [e for e in steps if not 0 < e < epochs]
        if late:
            raise ConfigError(
                f"{where}: optim.step_epochs {steps}: milestone(s) {late} are not inside the "
                f"{epochs:g} training epochs, so the lr would never decay there; set "
                f"optim.step_epochs to epochs in (0, {epochs:g}) or use optim.schedule: cosine"
            )
        if steps != sorted(set(steps)):
            raise ConfigError(
                f"{where}: optim.step_epochs {steps} must be increasing (each milestone once)"
            )


@dataclass(frozen=True)
class EncoderConfig:
    """The timm encoder of a downstream stage: ``backbone`` and ``backbone_kwargs`` (they must
    match the pre-training run's ``encoder.pt`` meta), input size and ``global_pool`` (null:
    timm's default). Stages extend it with their heads' fields."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = bounded(224, ge=1)
    global_pool: str | None = None


@dataclass(frozen=True)
class ImageFolderData:
    """An ImageFolder dataset (``root/split/<class>/<image>``), its validation split, whether
    unreadable images are skipped (both splits) and the loader workers."""

    root: str = "data/imagenet"
    split: str = "train"
    val_split: str = "val"
    skip_corrupt: bool = False
    num_workers: int = bounded(0, ge=0)

    @property
    def on_corrupt(self) -> Literal["skip", "error"]:
        return "skip" if self.skip_corrupt else "error"


@dataclass(frozen=True)
class CropFlipData(ImageFolderData):
    """An ImageFolder dataset trained on random-resized crops (``crop_scale``: the area
    fraction range) with an optional horizontal flip."""

    crop_scale: tuple[float, float] = bounded((0.08, 1.0), gt=0, le=1)
    hflip: bool = True


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build config dataclass ``cls`` from a plain mapping, validating keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hint = ""
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}{hint}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
            if "range" in f.metadata:
                check_range(kwargs[name], f.metadata["range"], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) from a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        key_t, val_t = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(key_t, k, f"{where} key"): _coerce(val_t, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


__all__ = [
    "ConfigError",
    "CropFlipData",
    "EpochRunConfig",
    "EpochWarmupCosine",
    "ImageFolderData",
    "OptimBase",
    "Range",
    "RunConfig",
    "TransferRunConfig",
    "bounded",
    "check_range",
    "check_ranges",
    "from_dict",
    "load_yaml",
    "to_dict",
]
