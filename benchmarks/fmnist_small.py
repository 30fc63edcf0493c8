"""Does masked-image pre-training help fine-tuning on real Fashion-MNIST, at the same budget?

Runs the ``a2mim`` CLI as subprocesses, one after the other:

1. ``a2mim prepare fashion-mnist``: a balanced subset (``--train-per-class`` / ``--val-per-class``,
   default 1000 / 100: 10,000 training and 1,000 validation images) as an ImageFolder;
2. ``a2mim pretrain --config small`` twice (recipe ``pretrain_small``): A²MIM
   (``a2mim_resnet18``) and SimMIM (``simmim_resnet18``), ``--epochs-pretrain`` epochs each;
3. ``a2mim finetune --config small`` three times (recipe ``finetune_small``) with the same
   budget, ``--epochs-finetune`` epochs: from scratch, and from each pre-trained encoder.

It prints a table (method, top-1, top-5 on the validation subset, pre-training and fine-tuning
seconds: wall clock of the CLI processes, start-up included) and, as the last line,
``scratch=<top-1> simmim=<top-1> a2mim=<top-1>``.

Resumable: run folders are named by the options that change them (data subset, epochs, seed)
under ``--out``; a run whose ``metrics.json`` exists is reused, an interrupted one resumes from its
checkpoint (the seconds of every attempt add up). Each stage's output goes to ``<run>/bench.log``.

    .venv/bin/python benchmarks/fmnist_small.py          # full size (the *_small recipes)
    .venv/bin/python benchmarks/fmnist_small.py --train-per-class 50 --val-per-class 20 \\
        --epochs-pretrain 1 --epochs-finetune 1 --out /tmp/fm_smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from a2mim import atomic

METHODS = ("scratch", "simmim", "a2mim")
PRESETS = {"a2mim": "a2mim_resnet18", "simmim": "simmim_resnet18"}
TIMES_FILE = "bench_seconds.json"


def _cli(args: list[str], log: Path, threads: int) -> float:
    """Run ``a2mim <args>`` with its output in ``log``; returns the seconds it took."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "a2mim.cli", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write("$ a2mim " + " ".join(args) + "\n")
        out.flush()
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"`a2mim {' '.join(args)}` failed with status {code}; end of {log}:\n{tail}")
    return seconds


def _stage(stage: str, run: Path, sets: dict[str, object], init: Path | None, threads: int):
    """``(metrics, seconds)`` of a stage run in ``run``, reusing a finished one."""
    times_path = run / TIMES_FILE
    if not (run / "metrics.json").exists():
        args = [stage, "--config", "small", "--out", str(run)]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        if init is not None:
            args += ["--init", str(init)]
        print(f"[fmnist_small] {stage} -> {run}", flush=True)
        seconds = _cli(args, run / "bench.log", threads)
        before = json.loads(times_path.read_text())["seconds"] if times_path.exists() else 0.0
        atomic.write_text(times_path, json.dumps({"seconds": before + seconds}))
    else:
        print(f"[fmnist_small] reusing the finished {stage} run {run}", flush=True)
    seconds = json.loads(times_path.read_text())["seconds"] if times_path.exists() else float("nan")
    return json.loads((run / "metrics.json").read_text()), seconds


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = args.out.resolve()
    data = out / "data" / f"fashion-mnist_{args.train_per_class}x{args.val_per_class}"
    prepare = ["prepare", "fashion-mnist", "--out", str(data)]
    prepare += ["--train-per-class", str(args.train_per_class)]
    prepare += ["--val-per-class", str(args.val_per_class), "--seed", str(args.seed)]
    _cli(prepare, out / "prepare.log", args.threads)  # reuses a folder with the same manifest

    common = {"data.root": data, "seed": args.seed, "progress": "false", "track": "false"}
    tag = f"{data.name}_seed{args.seed}"
    pre_tag = f"{tag}_pre{args.epochs_pretrain}"
    rows: dict[str, dict[str, float]] = {}
    for method in METHODS:
        pre_seconds = 0.0
        init = None
        if method != "scratch":
            pre_run = out / "runs" / pre_tag / f"pretrain_{method}"
            sets = {**common, "epochs": args.epochs_pretrain, "model.preset": PRESETS[method]}
            _, pre_seconds = _stage("pretrain", pre_run, sets, None, args.threads)
            init = pre_run / "encoder.pt"
        ft_tag = f"{tag if init is None else pre_tag}_ft{args.epochs_finetune}"
        ft_run = out / "runs" / ft_tag / f"finetune_{method}"
        sets = {**common, "epochs": args.epochs_finetune}
        metrics, ft_seconds = _stage("finetune", ft_run, sets, init, args.threads)
        rows[method] = {
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "pretrain_s": pre_seconds,
            "finetune_s": ft_seconds,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("results/bench/fmnist_small"), help="working folder"
    )
    parser.add_argument("--epochs-pretrain", type=int, default=20, help="default 20 (recipe)")
    parser.add_argument("--epochs-finetune", type=int, default=20, help="default 20 (recipe)")
    parser.add_argument("--train-per-class", type=int, default=1000, help="default 1000")
    parser.add_argument("--val-per-class", type=int, default=100, help="default 100")
    parser.add_argument("--seed", type=int, default=0, help="subset draw and training seed")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads per stage"
    )
    args = parser.parse_args()
    for name in ("epochs_pretrain", "epochs_finetune", "train_per_class", "val_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")

    rows = run(args)
    print(
        f"\nFashion-MNIST {args.train_per_class}/{args.val_per_class} per class, ResNet-18 at "
        f"32 px; pre-training {args.epochs_pretrain} epochs, fine-tuning {args.epochs_finetune} "
        f"epochs (same recipe for all), {args.threads} threads"
    )
    print(f"{'method':8s} {'top-1':>7s} {'top-5':>7s} {'pretrain s':>11s} {'finetune s':>11s}")
    for method, r in rows.items():
        pre = "-" if method == "scratch" else f"{r['pretrain_s']:.1f}"
        print(f"{method:8s} {r['top1']:7.2f} {r['top5']:7.2f} {pre:>11s} {r['finetune_s']:11.1f}")
    print(" ".join(f"{m}={rows[m]['top1']:.2f}" for m in METHODS))


if __name__ == "__main__":
    main()
