"""Helpers for tests that run Snakemake on the project's Snakefile (as a real subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(*args: str, timeout: float = 300, env: dict | None = None):
    """Run ``snakemake *args`` in the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [str(SNAKEMAKE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run as {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    stats: dict[str, int] = {}
    for line in block.splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match:
            break
        stats[match.group(1)] = int(match.group(2))
    return stats


def load_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "workflow" / "config" / f"{name}.yaml").read_text())


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
