"""benchmarks/gpu_throughput.py --cpu-smoke runs end to end (the GPU run uses the same code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"


def test_cpu_smoke_prints_every_figure() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--amp", "none"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for model in ("resnet18", "vit_tiny"):
        block = out.split(f"{model}: ", 1)[1]
        for name in ("backbone", "a2mim", "pipe_pil", "pipe_device", "data_pil", "data_device"):
            value = float(re.search(rf"^\s+{name}\s+([0-9.]+) img/s", block, re.M).group(1))
            assert value > 0, (model, name)
        ratios = re.search(rf"^ratios {model}: (.*)$", out, re.M).group(1)
        for key in ("a2mim/backbone", "pipe_pil/a2mim", "pipe_device/a2mim"):
            assert float(re.search(rf"{re.escape(key)}=([0-9.]+)", ratios).group(1)) > 0
    assert "train_gflops_per_image=" in out.split("ratios vit_tiny:", 1)[1]
    assert "cpus=" in out
