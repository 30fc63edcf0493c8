"""Three per-step and per-job costs around the training step, each against its replacement,
measured in one run on one CPU thread (ratios: old / new):

* the AdamW step over a ResNet-18's parameters: torch's CPU default (one kernel per tensor and
  operation) and for-each, against the fused kernel the stages now use
  (`a2mim.train.optim.FUSED_OPTIMIZERS`);
* seeding a sample's augmentation: ``torch.manual_seed`` (which also seeds CUDA: lazily, with a
  stack trace recorded per call, here under a stack as deep as a DataLoader's) against
  `a2mim.train.sampling.seed_cpu`;
* the end of a job process with torch, timm and MLflow loaded: the interpreter's teardown against
  `a2mim.launch`'s exit after the result (``os._exit`` once the result file exists).

    python benchmarks/cpu_overheads.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from a2mim.train.sampling import seed_cpu

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow, timm, torch
    import a2mim.stages.finetune
    from a2mim.launch import _exit_after_result
    model = timm.create_model("resnet18")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    result = Path(sys.argv[2])
    if sys.argv[1] == "fast":
        result.write_text("done")
        import atexit
        atexit.register(_exit_after_result, result)
    sys.stderr.write(repr(time.time()))
    """
)


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def optimizer_steps(repeats: int) -> dict[str, float]:
    import timm

    params = list(timm.create_model("resnet18", num_classes=10).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    kinds = {
        "per_tensor": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    return {
        kind: _time(torch.optim.AdamW(params, lr=1e-3, **kw).step, repeats)
        for kind, kw in kinds.items()
    }


def _deep(depth: int, fn):
    return fn() if depth == 0 else _deep(depth - 1, fn)


def seeding(repeats: int, depth: int = 40) -> dict[str, float]:
    calls = 200

    def run(seed):
        return lambda: _deep(depth, lambda: [seed(i) for i in range(calls)])

    with torch.random.fork_rng(devices=[]):
        return {
            "manual_seed": _time(run(torch.manual_seed), repeats) / calls,
            "seed_cpu": _time(run(seed_cpu), repeats) / calls,
        }


def process_exit(repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "job.py"
        script.write_text(EXIT_SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out: dict[str, list[float]] = {"teardown": [], "exit_after_result": []}
        for i in range(repeats):
            for kind, mode in (("teardown", "normal"), ("exit_after_result", "fast")):
                proc = subprocess.run(
                    [sys.executable, str(script), mode, str(Path(tmp) / f"result{i}")],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                out[kind].append(time.time() - float(proc.stderr.strip().splitlines()[-1]))
    return {kind: sorted(v)[len(v) // 2] for kind, v in out.items()}  # medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    opt = optimizer_steps(args.repeats)
    print(
        "adamw step ms: "
        + " ".join(f"{k}={v * 1e3:.1f}" for k, v in opt.items())
        + f"  per_tensor/fused={opt['per_tensor'] / opt['fused']:.2f}"
        + f" foreach/fused={opt['foreach'] / opt['fused']:.2f}",
        flush=True,
    )
    seed = seeding(args.repeats)
    print(
        f"seed per sample us: manual_seed={seed['manual_seed'] * 1e6:.1f} "
        f"seed_cpu={seed['seed_cpu'] * 1e6:.2f}  "
        f"ratio={seed['manual_seed'] / seed['seed_cpu']:.0f}",
        flush=True,
    )
    ends = process_exit(max(3, args.repeats // 5))
    print(
        f"job process exit s (median): teardown={ends['teardown']:.2f} "
        f"exit_after_result={ends['exit_after_result']:.2f}  "
        f"ratio={ends['teardown'] / ends['exit_after_result']:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
