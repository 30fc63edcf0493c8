"""A stage's ``metrics.jsonl``: one JSON line per logged step, cut back on resume."""

from __future__ import annotations

import json
from pathlib import Path

from a2mim import atomic


def append(path: Path, step: int, row: dict) -> None:
    """Append ``{"step": step, **row}`` as one line."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **row}) + "\n")


def truncate(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint a resumed run restarts from (step > ``step``)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
    atomic.write_text(path, "".join(ln + "\n" for ln in keep))
