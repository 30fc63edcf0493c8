"""A stage's ``metrics.jsonl``: one JSON line per logged step, cut back on resume."""

from __future__ import annotations

import json
import time
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


class TrainLog:
    """The per-step log of a stage's training loop.

    ``step(done, n_images, row)`` after every optimiser step: every ``every`` steps and at the
    last step, ``row`` plus ``img_per_s`` (images since the previous logged row per second) becomes
    :attr:`last` and, from the writing rank, a line of ``path`` and the tracker's metrics at step
    ``done``. With ``progress`` (and on the writing rank) a tqdm bar named ``desc`` advances every
    step and shows ``row["loss"]``.
    """

    def __init__(
        self,
        path: Path,
        tracker,
        *,
        every: int,
        total: int,
        start: int,
        write: bool,
        progress: bool,
        desc: str,
        loss_format: str = ".4f",
    ):
        self.path, self.tracker, self.every, self.total = path, tracker, every, total
        self.write, self.loss_format = write, loss_format
        self.last: dict[str, float] = {}
        self._since, self._images = time.perf_counter(), 0
        self._bar = None
        if progress and write:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=2.0)

    @classmethod
    def of_stage(cls, cfg, out: Path, tracker, total: int, start: int, rank: int, desc: str, **kw):
        """The log of a stage run in ``out`` (``metrics.jsonl``), written by rank 0, from a stage
        config's ``log_every_steps`` and ``progress``."""
        return cls(
            out / "metrics.jsonl",
            tracker,
            every=cfg.log_every_steps,
            total=total,
            start=start,
            write=rank == 0,
            progress=cfg.progress,
            desc=desc,
            **kw,
        )

    def step(self, done: int, n_images: int, row: dict[str, float]) -> None:
        self._images += n_images
        if done % self.every == 0 or done == self.total:
            now = time.perf_counter()
            self.last = {**row, "img_per_s": self._images / max(now - self._since, 1e-9)}
            self._since, self._images = now, 0
            if self.write:
                append(self.path, done, self.last)
                self.tracker.log_metrics(self.last, done)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row['loss']:{self.loss_format}}", refresh=False)

    def record(self, done: int, row: dict[str, float], **file_only: float) -> None:
        """From the writing rank, ``row`` (an evaluation, say) as a line of the file, after the
        ``file_only`` values, and as the tracker's metrics at step ``done``."""
        if self.write:
            append(self.path, done, {**file_only, **row})
            self.tracker.log_metrics(row, done)

    def close(self) -> None:
        """Close the progress bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
