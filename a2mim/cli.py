"""The one entry point: ``a2mim <command> ...``.

Commands
  prepare fashion-mnist   write real Fashion-MNIST as an ImageFolder (train/<class>, val/<class>)
  pretrain                A²MIM / SimMIM pre-training (resumes from --out when interrupted)
  finetune                fine-tune a pretrain encoder.pt (--init) or train from scratch
  linprobe                linear probe on frozen features of a pretrain encoder.pt (--init)
  segment                 UperNet semantic segmentation (ADE20K layout) from an encoder.pt (--init)
  detect                  COCO Mask R-CNN (box/mask AP) from a pretrain encoder.pt (--init)
  analyze FIGURE          paper Figs. 1/3/5 from run folders (--model LABEL=PATH, repeated)
  tables                  paper Tables 1-5 beside our MLflow numbers, and an audit of the claims
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
    for assignment in getattr(args, "tag", None) or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag expects KEY=VALUE, got {assignment!r}")
        data.setdefault("tags", {})[key] = value  # always a string, unlike --set
    if getattr(args, "models", None):  # analyze: the figure and each --model LABEL=PATH
        from a2mim.stages.analyze import parse_models

        data["figure"], data["models"] = args.figure, parse_models(args.models)
    return data


def _cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "scenes":
        return _prepare_scenes(args)
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


def _prepare_scenes(args: argparse.Namespace) -> int:
    """Toy COCO + ADE20K sets (real Fashion-MNIST objects on real photos) in <out>/{coco,ade}."""
    from a2mim.data.scenes import make_scenes

    out = Path(args.out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder (Snakemake creates its outputs' parents) is no dataset
    manifest = make_scenes(
        out,
        n_train=args.train or 400,
        n_val=args.val or 100,
        img_size=args.size,
        seed=args.seed,
        fmnist_dir=args.source,
    )
    print(json.dumps({k: v for k, v in manifest.items() if isinstance(v, int | float | str)}))
    print(f"prepared scenes in {out}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    """Load, validate and run one training stage (``pretrain``, ``finetune``, ``linprobe``)."""
    import importlib

    stage = importlib.import_module(f"a2mim.stages.{args.command}")
    data = _stage_config(args.command, args)
    if getattr(args, "init", None) is not None:
        data["init"] = str(args.init)
    cfg = stage.load_config(data, where=str(args.config))
    from a2mim.train.distributed import process_group

    with process_group(cfg.device):  # joins torchrun's / Submitit's group when WORLD_SIZE > 1
        metrics = stage.run(cfg, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    """Check the stage's arguments and config here, then run it as a Submitit job and wait."""
    import importlib

    from a2mim import launch

    cfg, argv = launch.config_from_args(args)
    stage_args = build_parser().parse_args(argv)  # usage errors exit 2 before any submission
    if stage_args.command == "launch":
        raise launch.LaunchError("a2mim launch cannot launch itself")
    if stage_args.func is _cmd_stage:
        stage = importlib.import_module(f"a2mim.stages.{stage_args.command}")
        data = _stage_config(stage_args.command, stage_args)
        if getattr(stage_args, "init", None) is not None:
            data["init"] = str(stage_args.init)
        stage.load_config(data, where=str(stage_args.config))  # config errors: exit 2 here
    return launch.launch(cfg, argv)


def _cmd_tables(args: argparse.Namespace) -> int:
    """Write the paper's tables beside our MLflow numbers, and the audit, into --out."""
    from a2mim.tables import write_tables
    from a2mim.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri, args.results)
    for path in write_tables(args.experiment, args.out, uri, args.table, args.audit_only):
        print(path)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from a2mim import recipes
    from a2mim.mim.presets import PRESETS

    print("method presets (model.preset):")
    for name, (_, note) in PRESETS.items():
        print(f"  {name:20s} {note}")
    for stage in ("pretrain", "finetune", "linprobe", "detect", "segment", "analyze"):
        names = recipes.available(stage)
        if names:
            print(f"{stage} recipes (a2mim {stage} --config NAME):", ", ".join(names))
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
        description="fashion-mnist: write real Fashion-MNIST (Debian's dataset-fashion-mnist, "
        "or the official "
        "download where that is absent) as <out>/{train,val}/<class>/<index>.png.",
    )
    p.add_argument(
        "dataset",
        choices=["fashion-mnist", "scenes"],
        help="fashion-mnist (ImageFolder) or scenes (toy COCO + ADE20K sets)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    p.add_argument("--source", type=Path, help="folder with the four IDX .gz files")
    p.add_argument("--train-per-class", type=int, help="balanced subset: train images per class")
    p.add_argument("--val-per-class", type=int, help="balanced subset: val images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.add_argument("--train", type=int, help="scenes: training images (default 400)")
    p.add_argument("--val", type=int, help="scenes: validation images (default 100)")
    p.add_argument("--size", type=int, default=128, help="scenes: image side in px (default 128)")
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
        (
            "detect",
            "COCO Mask R-CNN (torchvision or detectron2 backend)",
            "Fine-tune Mask R-CNN on a COCO-format instance set from the encoder of a pretrain "
            "run (--init <run>/encoder.pt; without it, from scratch) and report box/mask AP. "
            "Restarting the same command resumes from <out>/checkpoint.pt.",
        ),
        (
            "knn",
            "weighted k-NN accuracy of frozen features",
            "Classify the validation images by a weighted vote of their k nearest training "
            "images in the feature space of a pretrain encoder (--init <run>/encoder.pt), as "
            "DINO's k-NN evaluation.",
        ),
        (
            "segment",
            "semantic segmentation (UperNet, ADE20K layout)",
            "Train UperNet on the encoder of a pretrain run (--init <run>/encoder.pt; without "
            "it, from scratch) and report mIoU. Restarting the same command resumes from "
            "<out>/checkpoint.pt.",
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
            help=(
                "encoder.pt of a pretrain run, or model.pt of a finetune run (a supervised "
                "encoder); overrides the config's init"
            ),
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set epochs=5 --set data.root=/data/in1k",
        )
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser(
        "analyze",
        help="paper Figs. 1, 3, 5 from finished runs",
        description="figure1: occlusion robustness and multi-order interactions of finetune "
        "runs; figure3: Fourier / variance of block outputs of pretrain or finetune runs; "
        "figure5: reconstructions of pretrain runs. Writes <out>/FIGURE.png/.svg/.csv and "
        "metrics.json; PATH 'random' is a random-init model (figures 1, 3).",
    )
    p.add_argument("figure", choices=["figure1", "figure3", "figure5"], help="which figure")
    p.add_argument("--config", required=True, help="YAML file or recipe (analyze_<NAME>.yaml)")
    p.add_argument("--out", required=True, type=Path, help="output folder of the figure")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a curve / row: legend label and run folder, e.g. --model A2MIM=results/runs/ft",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_cmd_stage)

    from a2mim import launch

    p = sub.add_parser(
        "launch",
        help="run a stage as a Submitit job (local, SLURM or in-process) and wait",
        description=(launch.__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch.add_arguments(p)
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser(
        "tables",
        help="paper Tables 1-5 beside our MLflow numbers, with an audit",
        description="Read the FINISHED MLflow runs tagged experiment=NAME (only MLflow, never "
        "result files) and write <out>/table1..table5 .md/.csv/.tex (paper, ours, delta per "
        "cell) and <out>/audit.md/.json (do the paper's orderings hold?). With --table, only "
        "those tables' files; with --audit-only, only the audit.",
    )
    p.add_argument("--experiment", required=True, help="the workflow config's name (tag)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--tracking-uri", help="MLflow URI (default: $A2MIM_TRACKING_URI, then the results store)"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="folder of the default store <results>/mlflow.db (default: results)",
    )
    p.add_argument(
        "--table",
        nargs="+",
        action="extend",
        metavar="KEY",
        help="only these tables: table1..table5 or their paper_tables.yaml keys",
    )
    p.add_argument(
        "--audit-only", action="store_true", help="write only audit.md/.json (no table files)"
    )
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("presets", help="list method presets and recipes")
    p.set_defaults(func=_cmd_presets)
    for stage_parser in sub.choices.values():  # every training / evaluation stage
        if stage_parser.get_default("func") is _cmd_stage:
            stage_parser.add_argument(
                "--tag",
                action="append",
                metavar="KEY=VALUE",
                help="extra MLflow tag of the run (string), e.g. --tag experiment=tiny",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from a2mim.launch import LaunchError
    from a2mim.tracking import TrackingError

    try:
        return args.func(args)
    except (
        ConfigError,
        TrackingError,
        LaunchError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as exc:
        print(f"a2mim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
