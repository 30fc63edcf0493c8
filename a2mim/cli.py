"""The one entry point: ``a2mim <command> ...``.

Commands
  prepare fashion-mnist   write real Fashion-MNIST as an ImageFolder (train/<class>, val/<class>)
  pretrain                A²MIM / SimMIM pre-training (resumes from --out when interrupted)
  finetune                fine-tune a pretrain encoder.pt (--init) or train from scratch
  linprobe                linear probe on frozen features of a pretrain encoder.pt (--init)
  segment                 UperNet semantic segmentation (ADE20K layout) from an encoder.pt (--init)
  detect                  COCO Mask R-CNN (box/mask AP) from a pretrain encoder.pt (--init)
  analyze FIGURE          paper Figs. 1/3/5 from run folders (--model LABEL=PATH, repeated)
  check STAGE ARGS        resolve and validate a stage's command line (what launch runs first)
  launch [opts] -- STAGE  run a stage as a Submitit job (local, SLURM, in-process) and wait
  tables                  paper Tables 1-5 beside our MLflow numbers, and an audit of the claims
  presets                 list the method presets and the recipes shipped with the package
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from a2mim.config import ConfigError


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
    """Resolve, validate and run one stage (``a2mim <stage> ...``) in this process."""
    from a2mim import command

    metrics = command.run(args)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Resolve and validate a stage's command line without running it."""
    from a2mim import command

    argv = args.stage_argv[1:] if args.stage_argv[:1] == ["--"] else args.stage_argv
    if not argv:
        raise ConfigError("no stage given: a2mim check [--] <stage> <stage args>")
    from a2mim import preflight

    if preflight.plan_elsewhere():  # missing backend / data root: the jobs' machine may have them
        missing = "ignore" if args.no_data else "warn"
        for text in command.check(
            argv, require_data=not args.no_data, require_env=False, missing_root=missing
        ):
            print(f"{preflight.PLAN_ELSEWHERE_LABEL}: {text}", file=sys.stderr)
    else:
        command.check(argv, require_data=not args.no_data)
    print(f"a2mim check: `a2mim {' '.join(argv)}` is ready to run")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    """Check the stage's command line (in a child process), then run it as a job and wait."""
    from a2mim import launch

    cfg, argv = launch.config_from_args(args)
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
    from a2mim.registry import STAGES

    for stage in STAGES:
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

    from a2mim import command, launch
    from a2mim.registry import STAGES

    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help, description=stage.description)
        command.add_arguments(p, stage)
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser(
        "check",
        help="resolve and validate a stage's command line without running it",
        description="Everything `a2mim <stage>` checks before it trains: the recipe with every "
        "--set, the config's keys, types and ranges, the backend and backbone, and the layout "
        "of data.root. `a2mim launch` runs it before it submits a job; the workflow runs the "
        "same checks at planning time.",
    )
    p.add_argument(
        "--no-data",
        action="store_true",
        help="a data.root that does not exist here is no error (a wrong layout still is)",
    )
    p.add_argument("stage_argv", nargs=argparse.REMAINDER, metavar="-- STAGE ARGS")
    p.set_defaults(func=_cmd_check)

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
        "cell) and <out>/audit.md/.json (do the paper's orderings hold, beyond the 95 % CI of "
        "seeds and validation samples?) and <out>/experiment.md/.csv (every run). With --table, "
        "only those tables' files; with --audit-only, only the audit and experiment files.",
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
        "--audit-only",
        action="store_true",
        help="write only audit.md/.json and experiment.md/.csv (no table files)",
    )
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("presets", help="list method presets and recipes")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from a2mim.atomic import DiskFullError
    from a2mim.launch import LaunchError
    from a2mim.tracking import TrackingError

    try:
        return args.func(args)
    except (
        ConfigError,
        TrackingError,
        LaunchError,
        DiskFullError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as exc:
        print(f"a2mim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
