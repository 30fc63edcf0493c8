"""Pre-flight: what a stage would otherwise find out inside its job, hours later, on a GPU node.

:func:`check` runs after a stage's config validated (keys, types, ranges) and before anything is
submitted: by the CLI, by ``a2mim launch`` (through ``a2mim check``) and by the workflow at
planning time (``snakemake -n`` too). It checks that

- the backend the config asks for is installed (detectron2),
- the backbone is a timm model, and for pre-training that a backbone adapter handles it (the
  model is built on the ``meta`` device: no memory, no weights),
- the ``--init`` checkpoint, when it exists, was trained as an encoder of the config's backbone
  family (its ``meta``: a reference ViT, timm BEiT, does not load into a plain ViT recipe nor the
  reverse; `check_init_family`), and the workflow checks the same between a run and the run it
  starts from before anything ran (`check_chain`); a BEiT UperNet evaluates with ``slide``,
- ``data.root`` holds the layout the stage reads (ImageFolder splits, COCO annotation files and
  image folders, ADE20K ``images/`` and ``annotations/``); the dataset modules' own
  ``validate_root`` is used where they offer one.

Every problem is a :class:`PreflightError` naming the value, what was found and the fix.

What depends on the machine rather than the config (a backend that is not installed here, an
external dataset root that does not exist here) is an error too, in dry runs as in real ones,
unless the user plans on a machine other than the jobs' (a login node without the data):
:func:`plan_elsewhere` (workflow config ``plan_elsewhere: true`` or ``A2MIM_PLAN_ELSEWHERE=1``)
turns exactly those into labelled warnings.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from a2mim.config import ConfigError


class PreflightError(ConfigError):
    """A config that validates but cannot run here; the message names the fix."""


class NotInstalledError(PreflightError):
    """What the config asks for is not installed on this machine (a backend)."""


PLAN_ELSEWHERE_ENV = "A2MIM_PLAN_ELSEWHERE"
PLAN_ELSEWHERE_LABEL = (
    "a2mim pre-flight WARNING (plan_elsewhere: planning on a machine other than the jobs'; "
    "they fail there unless it has this)"
)
DRY_RUN_LABEL = (
    "a2mim pre-flight WARNING (dry run: a real run on this machine stops here, before it "
    "submits anything)"
)


def plan_elsewhere(config: Mapping[str, Any] | None = None) -> bool:
    """Whether the user plans on a machine other than the jobs' (a login node without the
    data): the workflow config's ``plan_elsewhere: true`` or ``A2MIM_PLAN_ELSEWHERE=1``."""
    if config is not None and config.get("plan_elsewhere"):
        return True
    return os.environ.get(PLAN_ELSEWHERE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


PLAN_ELSEWHERE_HELP = (
    f"(to plan on a machine without the data or the backend, e.g. a login node: "
    f"plan_elsewhere: true in the workflow config, or {PLAN_ELSEWHERE_ENV}=1)"
)


def check(
    stage: Any,
    cfg: Any,
    *,
    require_data: bool = True,
    require_env: bool = True,
    missing_root: str | None = None,
) -> list[str]:
    """Every pre-flight check of ``cfg`` for registry entry ``stage``; returns the problems of
    this machine that were let pass (see below), to be shown as warnings.

    ``require_data=False`` (the workflow, whose inits are written by upstream runs): a missing
    ``--init`` file and a missing ``data.root`` are no error; a root or init that exists but is
    wrong still is. ``missing_root`` overrides what a missing ``data.root`` is: ``"error"``,
    ``"warn"`` (returned) or ``"ignore"``. ``require_env=False`` (:func:`plan_elsewhere`): a
    backend that is not installed here is returned instead of raised."""
    if missing_root is None:
        missing_root = "error" if require_data else "ignore"
    if missing_root not in ("error", "warn", "ignore"):
        raise ValueError(f"missing_root must be error, warn or ignore, not {missing_root!r}")
    warnings: list[str] = []
    backend = getattr(cfg, "backend", None)
    if isinstance(backend, str):
        try:
            check_backend(backend)
        except NotInstalledError as exc:
            if require_env:
                raise
            warnings.append(str(exc))
    for backbone, kwargs, needs_adapter in _backbones(cfg):
        check_backbone(backbone, kwargs, needs_adapter)
    init = getattr(cfg, "init", None)
    if isinstance(init, str):
        check_init(Path(init), require_data)
        check_init_family(Path(init), cfg)
    check_fixed_grid(stage, cfg)
    data = getattr(cfg, "data", None)
    root = getattr(data, "root", None)
    if isinstance(root, str):
        if not Path(root).exists():
            text = (
                f"data.root: {root} does not exist; point data.root (--set data.root=... or "
                f"the workflow config's datasets) at {_a(_LAYOUT_HELP[stage.layout])}"
            )
            if missing_root == "error":
                raise PreflightError(text)
            if missing_root == "warn":
                warnings.append(text)
            return warnings
        check_layout(stage.layout, Path(root), data)
    return warnings


def missing_roots(uses: Mapping[str, tuple[str, Iterable[str], Iterable[str]]]) -> list[str]:
    """One problem per external dataset whose root does not exist here: ``uses`` maps a
    workflow dataset name to ``(root, layouts its runs read, those runs)``."""
    problems = []
    for name, (root, layouts, runs) in uses.items():
        if Path(root).exists():
            continue
        wanted = " and ".join(_LAYOUT_HELP[layout] for layout in sorted(set(layouts)))
        problems.append(
            f"datasets.{name}.root: {root} does not exist on this machine (read by "
            f"{', '.join(sorted(runs))}); set datasets.{name}.root in the workflow config "
            f"(or --config/--configfile) to {_a(wanted)}"
        )
    return problems


def check_backend(name: str) -> None:
    """``detectron2`` must be importable; ``auto`` and ``torchvision`` always run."""
    if name != "detectron2":
        return
    from a2mim.detection import BackendUnavailable, resolve_backend

    try:
        resolve_backend(name)
    except BackendUnavailable as exc:
        raise NotInstalledError(str(exc)) from None


def _backbones(cfg: Any) -> list[tuple[str, dict[str, Any], bool]]:
    """``(timm name, kwargs, needs an adapter)`` of the config's backbones."""
    found = []
    if hasattr(cfg, "mim_config"):  # pre-training: the preset's backbone, through an adapter
        mim = cfg.mim_config()
        found.append((mim.backbone, dict(mim.backbone_kwargs), True))
    model = getattr(cfg, "model", None)
    name = getattr(model, "backbone", None)
    if isinstance(name, str):
        found.append((name, {}, False))
    return found


def check_backbone(name: str, kwargs: dict[str, Any], needs_adapter: bool) -> None:
    import timm

    from a2mim.train.encoder import check_backbone as check_timm_name

    try:
        check_timm_name(name, "backbone")
    except ConfigError as exc:
        raise PreflightError(f"{exc}; use a name from timm.list_models()") from None
    if not needs_adapter:
        return
    import torch

    from a2mim.backbones import adapt, adapter_classes

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    try:
        adapt(model)
    except TypeError:
        families = [c.family for c in adapter_classes()]
        raise PreflightError(
            f"backbone {name!r} ({type(model).__name__}) has no backbone adapter (families: "
            f"{', '.join(families)}); pick a backbone of those families, or add an adapter "
            "module to a2mim/backbones/ (README: Adding a backbone family)"
        ) from None


def check_init(path: Path, require: bool) -> None:
    """``--init`` is a checkpoint file (absent is an error only with ``require``: in the
    workflow, the upstream run writes it later)."""
    if not path.exists():
        if require:
            raise PreflightError(
                f"init: {path} does not exist; --init takes encoder.pt of a finished pretrain "
                "run or model.pt of a finished finetune run"
            )
        return
    from a2mim.train.checkpoint import not_a_checkpoint

    problem = not_a_checkpoint(path) if path.is_file() else f"{path} is a folder"
    if problem:
        raise PreflightError(f"init: {problem}")


def _encoder(cfg: Any) -> tuple[str, dict[str, Any]] | None:
    """``(timm name, kwargs)`` of the encoder a config trains or loads."""
    if hasattr(cfg, "mim_config"):
        mim = cfg.mim_config()
        return mim.backbone, dict(mim.backbone_kwargs)
    model = getattr(cfg, "model", None)
    name = getattr(model, "backbone", None)
    if not isinstance(name, str):
        return None
    return name, dict(getattr(model, "backbone_kwargs", None) or {})


def check_init_family(path: Path, cfg: Any) -> None:
    """An existing ``--init`` checkpoint's encoder (its ``meta``) is of the config's backbone
    family: a reference-ViT (BEiT) encoder into a plain-ViT recipe, or the reverse, is an error
    that names both and the recipe to use."""
    from a2mim.models.beit_transfer import check_init_family as compare
    from a2mim.models.beit_transfer import init_encoder

    encoder = _encoder(cfg)
    if encoder is None or not path.is_file():
        return
    trained = init_encoder(path)
    if trained is None:
        return
    problem = compare(trained, *encoder, where=f"init {path}")
    if problem:
        raise PreflightError(problem)


def check_fixed_grid(stage: Any, cfg: Any) -> None:
    """A BEiT UperNet is built at the crop size (fixed relative position tables): it evaluates
    with ``eval.mode: slide``; ``whole`` would feed it larger images."""
    mode = getattr(getattr(cfg, "eval", None), "mode", None)
    if getattr(stage, "name", None) != "segment" or mode != "whole":
        return
    from a2mim.models.beit_transfer import encoder_family

    encoder = _encoder(cfg)
    if encoder is not None and encoder_family(*encoder) == "beit":
        raise PreflightError(
            f"eval.mode whole with {encoder[0]} (a BEiT, built at data.crop_size: its relative "
            f"position tables are fixed to that grid): set eval.mode: slide"
        )


def check_chain(argv: list[str], init_argv: list[str], where: str) -> None:
    """Before any run exists (the workflow's planning): the run of ``argv`` (``<stage> <args>``)
    loads the encoder that the run of ``init_argv`` trains; both must be of one backbone family
    (a reference-ViT, BEiT, pretrain run into a plain-ViT transfer recipe fails its job at start,
    hours later, otherwise)."""
    from a2mim import command
    from a2mim.models.beit_transfer import check_init_family as compare

    configs = [
        command.resolve(command.parse(args), require_data=False, require_env=False)
        for args in (argv, init_argv)
    ]
    built, trained = _encoder(configs[0]), _encoder(configs[1])
    if built is None or trained is None:
        return
    meta = {"backbone": trained[0], "backbone_kwargs": trained[1]}
    preset = getattr(getattr(configs[1], "model", None), "preset", None)
    if isinstance(preset, str):
        meta["preset"] = preset
    problem = compare(meta, *built, where=where)
    if problem:
        raise PreflightError(problem)


_LAYOUT_HELP = {
    "imagefolder": "folder with <split>/<class>/<image> (ImageFolder: train/ and val/)",
    "coco": "COCO 2017 folder: annotations/instances_{train,val}2017.json, train2017/, val2017/",
    "ade": "ADE20K folder (ADEChallengeData2016): images/{training,validation}/, "
    "annotations/{training,validation}/",
}


def _a(text: str) -> str:
    return f"{'an' if text[:1].upper() in 'AEIOU' else 'a'} {text}"


def check_layout(layout: str, root: Path, data: Any) -> None:
    """``root`` holds what a stage of ``layout`` reads (the config's split names and files)."""
    module = {"coco": "a2mim.data.coco", "ade": "a2mim.data.ade"}.get(layout)
    validate = getattr(importlib.import_module(module), "validate_root", None) if module else None
    if validate is not None:  # the dataset module's own check (it knows its layout best)
        try:
            validate(root, **_fields(validate, data))
        except (ValueError, FileNotFoundError) as exc:
            raise PreflightError(f"data.root: {exc}") from None
        return
    missing = [p for p in _expected(layout, root, data) if not p.exists()]
    if missing:
        raise PreflightError(
            f"data.root: {root} does not hold what this stage reads: missing "
            f"{', '.join(str(p) for p in missing)}; data.root must be {_a(_LAYOUT_HELP[layout])}"
        )
    if layout == "imagefolder":
        for split in _expected(layout, root, data):
            if not any(p.is_dir() for p in split.iterdir()):
                raise PreflightError(
                    f"data.root: {split} has no class folders; data.root must be "
                    f"{_a(_LAYOUT_HELP[layout])}"
                )


def _fields(func: Any, data: Any) -> dict[str, Any]:
    """The config's data fields that ``func`` takes as keyword arguments."""
    import inspect

    names = inspect.signature(func).parameters
    values = dataclasses.asdict(data) if dataclasses.is_dataclass(data) else {}
    kwargs = {k: v for k, v in values.items() if k in names and k != "root"}
    splits = tuple(values[k] for k in ("split", "val_split") if values.get(k))
    if "splits" in names and splits:
        kwargs["splits"] = splits
    return kwargs


def _expected(layout: str, root: Path, data: Any) -> list[Path]:
    if layout == "coco":
        keys = ("train_ann", "train_images", "val_ann", "val_images")
        return [root / getattr(data, k) for k in keys if getattr(data, k, None)]
    if layout == "ade":
        splits = [getattr(data, k, None) for k in ("split", "val_split")]
        return [root / kind / s for s in splits if s for kind in ("images", "annotations")]
    splits = [getattr(data, k, None) for k in ("split", "val_split")]
    return [root / s for s in splits if s]


__all__ = [
    "DRY_RUN_LABEL",
    "PLAN_ELSEWHERE_ENV",
    "NotInstalledError",
    "PreflightError",
    "check",
    "check_backbone",
    "check_backend",
    "check_chain",
    "check_fixed_grid",
    "check_init_family",
    "check_layout",
    "missing_roots",
    "plan_elsewhere",
]
