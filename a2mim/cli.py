"""The one entry point: ``a2mim <command> ...``.

Commands
  prepare fashion-mnist   write real Fashion-MNIST as an ImageFolder (train/<class>, val/<class>)
  pretrain                A²MIM / SimMIM pre-training (resumes from --out when interrupted)
  finetune                fine-tune a pretrain encoder.pt (--init) or train from scratch
  linprobe                linear probe on frozen features of a pretrain encoder.pt (--init)
  presets                 list the method presets and the recipes shipped with the package
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from a2mim.config import ConfigError, load_yaml


def _set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def _stage_config(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    from a2mim import recipes

    data = load_yaml(recipes.resolve(stage, args.config))
    data.pop("stage", None)
    data.pop("derived", None)
    for assignment in args.set or []:
        _set_override(data, assignment)
    return data


def _cmd_prepare(args: argparse.Namespace) -> int:
    from a2mim.data.fashion_mnist import prepare_fashion_mnist

    manifest = prepare_fashion_mnist(
        args.out,
        source_dir=args.source,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
    )
    print(json.dumps({k: manifest[k] for k in manifest if k.startswith(("total", "num"))}))
    print(f"prepared {args.dataset} in {args.out}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    """Load, validate and run one training stage (``pretrain``, ``finetune``, ``linprobe``)."""
    import importlib

    stage = importlib.import_module(f"a2mim.stages.{args.command}")
    data = _stage_config(args.command, args)
    if getattr(args, "init", None) is not None:
        data["init"] = str(args.init)
    cfg = stage.load_config(data, where=str(args.config))
    metrics = stage.run(cfg, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from a2mim import recipes
    from a2mim.mim.presets import PRESETS

    print("method presets (model.preset):")
    for name, (_, note) in PRESETS.items():
        print(f"  {name:20s} {note}")
    print("pretrain recipes (--config NAME):", ", ".join(recipes.available("pretrain")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a2mim",
        description="A²MIM (Architecture-Agnostic Masked Image Modeling): stages of the pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "prepare",
        help="write a dataset in ImageFolder layout",
        description="Write real Fashion-MNIST (Debian's dataset-fashion-mnist, or the official "
        "download where that is absent) as <out>/{train,val}/<class>/<index>.png.",
    )
    p.add_argument("dataset", choices=["fashion-mnist"], help="dataset to prepare")
    p.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    p.add_argument("--source", type=Path, help="folder with the four IDX .gz files")
    p.add_argument("--train-per-class", type=int, help="balanced subset: train images per class")
    p.add_argument("--val-per-class", type=int, help="balanced subset: val images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "pretrain",
        help="A²MIM / SimMIM pre-training",
        description="Pre-train an encoder with masked image modeling. Restarting the same "
        "command resumes from <out>/checkpoint.pt.",
    )
    p.add_argument(
        "--config", required=True, help="YAML config file, or a recipe name (see `a2mim presets`)"
    )
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set epochs=5 --set data.root=/data/in1k",
    )
    p.set_defaults(func=_cmd_stage)

    for name, help_, desc in (
        (
            "finetune",
            "classification fine-tuning (timm)",
            "Fine-tune the encoder of a pretrain run (--init <run>/encoder.pt), or train from "
            "scratch without --init. Restarting the same command resumes from "
            "<out>/checkpoint.pt.",
        ),
        (
            "linprobe",
            "linear probe on frozen features",
            "Train BatchNorm + Linear on the frozen, pooled features of a pretrain encoder "
            "(--init <run>/encoder.pt; without it, of a random-init backbone). Restarting the "
            "same command resumes from <out>/checkpoint.pt.",
        ),
    ):
        p = sub.add_parser(name, help=help_, description=desc)
        p.add_argument(
            "--config",
            required=True,
            help=f"YAML config file, or a recipe name ({name}_<NAME>.yaml in a2mim/recipes)",
        )
        p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics)")
        p.add_argument(
            "--init",
            type=Path,
            metavar="CKPT",
            help="encoder.pt of a pretrain run (overrides the config's init)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set epochs=5 --set data.root=/data/in1k",
        )
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("presets", help="list method presets and recipes")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from a2mim.tracking import TrackingError

    try:
        return args.func(args)
    except (ConfigError, TrackingError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"a2mim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
