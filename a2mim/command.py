"""A stage's command line: its arguments, the resolved config, the pre-flight, and the run.

``a2mim <stage> --config RECIPE --out DIR [--init CKPT] [--set KEY=VALUE ...] [--tag ...]`` is
resolved in one place for every caller:

- the CLI runs it (:func:`run`),
- ``a2mim launch`` checks it before it submits anything (``a2mim check`` in a child process, so
  that the waiting launcher never imports torch) and the job runs it (:func:`run`),
- the workflow checks every run of the config at planning time, ``snakemake -n`` included
  (:func:`check`).

Resolving = the recipe (a name or a YAML file), then each ``--set`` (YAML 1.2 values; a mapping
merges into the mapping it replaces), then the tags and ``--init``; validating = the stage's
frozen config (unknown keys, types, ranges) plus :mod:`a2mim.preflight` (backends, backbones,
dataset layouts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from a2mim import preflight, registry
from a2mim.config import ConfigError, load_yaml

FIGURES = ("figure1", "figure3", "figure5")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's number rules: ``1e-3`` and ``1E5`` are floats
    (YAML 1.1 wants a dot, so PyYAML reads them as strings); ``yes``/``on`` stay strings."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def parse_value(key: str, raw: str) -> Any:
    """The value of ``--set key=raw``, parsed as YAML 1.2; bad YAML names the key and the fix."""
    try:
        return yaml.load(raw, Loader=_Yaml12Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {key}={raw}: the value is not valid YAML ({problem}); close brackets and "
            f"quotes, e.g. --set '{key}=[0.5, 1.0]', or quote a string: --set '{key}=\"text\"'"
        ) from None


def _merge(old: Any, new: Any) -> Any:
    """``new`` over ``old``; mappings merge key by key (so ``--set model.overrides={a: 1}``
    adds to the recipe's overrides instead of dropping them)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = _merge(node.get(parts[-1]), parse_value(key, raw))


def add_arguments(p: argparse.ArgumentParser, stage: registry.Stage) -> None:
    """The arguments of ``a2mim <stage>``."""
    if stage.name == "analyze":
        p.add_argument("figure", choices=FIGURES, help="which figure")
    p.add_argument(
        "--config",
        required=True,
        help=f"YAML config file, or a recipe name ({stage.name}_<NAME>.yaml in a2mim/recipes; "
        "see `a2mim presets`)",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics)")
    if stage.init:
        p.add_argument(
            "--init",
            type=Path,
            metavar="CKPT",
            help="encoder.pt of a pretrain run, or model.pt of a finetune run (a supervised "
            "encoder); overrides the config's init",
        )
    if stage.name == "analyze":
        p.add_argument(
            "--model",
            dest="models",
            action="append",
            required=True,
            metavar="LABEL=PATH",
            help="a curve / row: legend label and run folder, e.g. --model A2MIM=results/runs/ft",
        )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value (YAML), e.g. --set epochs=5 --set optim.base_lr=1e-3",
    )
    p.add_argument(
        "--tag",
        action="append",
        metavar="KEY=VALUE",
        help="extra MLflow tag of the run (string), e.g. --tag experiment=tiny",
    )


def parser() -> argparse.ArgumentParser:
    """A parser of stage command lines only (``<stage> <args>``), for the launcher and checks."""
    p = argparse.ArgumentParser(prog="a2mim")
    sub = p.add_subparsers(dest="command", required=True, metavar="stage")
    for stage in registry.STAGES.values():
        add_arguments(sub.add_parser(stage.name, help=stage.help), stage)
    return p


def config_data(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    """The stage's config as plain data: recipe, ``--set``, ``--tag``, ``--init``, models."""
    from a2mim import recipes

    data = load_yaml(recipes.resolve(stage, args.config))
    data.pop("stage", None)
    data.pop("derived", None)
    for assignment in args.set or []:
        apply_set(data, assignment)
    for assignment in args.tag or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag expects KEY=VALUE, got {assignment!r}")
        data.setdefault("tags", {})[key] = value  # always a string, unlike --set
    if getattr(args, "init", None) is not None:
        data["init"] = str(args.init)
    if stage == "analyze":
        from a2mim.stages.analyze import parse_models

        data["figure"], data["models"] = args.figure, parse_models(args.models)
    return data


def resolve(args: argparse.Namespace, **strict: bool) -> Any:
    """The stage's validated config: keys, types and ranges, then the pre-flight checks
    (``strict``: ``require_data``, ``require_env`` of :func:`a2mim.preflight.check`)."""
    return _resolve(args, **strict)[0]


def _resolve(args: argparse.Namespace, **strict: bool) -> tuple[Any, list[str]]:
    stage = registry.get(args.command)
    cfg = stage.load_config(config_data(stage.name, args), where=str(args.config))
    return cfg, preflight.check(stage, cfg, **strict)


def check(argv: Sequence[str], **strict: bool) -> list[str]:
    """Resolve and validate ``<stage> <args>`` without running it; returns the warnings (what
    ``strict`` let pass, see :func:`a2mim.preflight.check`)."""
    return _resolve(parse(argv), **strict)[1]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``<stage> <args>``; a usage error is a ConfigError (not argparse's exit)."""
    stream = io.StringIO()
    try:
        with contextlib.redirect_stderr(stream):
            return parser().parse_args(list(argv))
    except SystemExit:
        lines = stream.getvalue().strip().splitlines()
        raise ConfigError(
            f"`a2mim {' '.join(argv)}`: {lines[-1] if lines else 'bad arguments'}"
        ) from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve, validate and run one stage in this process (inside its process group)."""
    cfg = resolve(args)
    from a2mim.train.distributed import process_group

    with process_group(cfg.device):  # joins torchrun's / Submitit's group when WORLD_SIZE > 1
        return registry.get(args.command).module.run(cfg, args.out)


__all__ = ["add_arguments", "apply_set", "check", "config_data", "parse", "parse_value", "run"]
