"""`a2mim.train.steplog.TrainLog`: which steps make rows, what a row holds, who writes."""

from __future__ import annotations

import json

from a2mim.train.steplog import TrainLog


class Tracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, dict(metrics)))


def test_rows_every_n_steps_and_at_the_last(tmp_path):
    tracker = Tracker()
    path = tmp_path / "metrics.jsonl"
    log = TrainLog(
        path, tracker, every=3, total=7, start=0, write=True, progress=False, desc="test"
    )
    for done in range(1, 8):
        log.step(done, 4, {"loss": float(done), "lr": 0.1})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7] == [s for s, _ in tracker.logged]
    assert rows[-1]["loss"] == 7.0 and log.last["loss"] == 7.0
    assert all(r["img_per_s"] > 0 for r in rows)
    log.close()
    log.close()  # idempotent


def test_a_rank_that_does_not_write_keeps_the_last_row_only(tmp_path):
    tracker = Tracker()
    path = tmp_path / "metrics.jsonl"
    log = TrainLog(path, tracker, every=1, total=2, start=0, write=False, progress=True, desc="t")
    log.step(1, 4, {"loss": 0.5})
    assert not path.exists() and not tracker.logged
    assert log.last["loss"] == 0.5


def test_record_writes_evaluations_with_file_only_values(tmp_path):
    tracker = Tracker()
    path = tmp_path / "metrics.jsonl"
    log = TrainLog(path, tracker, every=5, total=10, start=0, write=True, progress=False, desc="t")
    log.record(4, {"top1": 50.0}, epoch=1)
    assert json.loads(path.read_text()) == {"step": 4, "epoch": 1, "top1": 50.0}
    assert tracker.logged == [(4, {"top1": 50.0})]  # the epoch is not a tracked metric here
    silent = TrainLog(
        path, tracker, every=5, total=10, start=0, write=False, progress=False, desc="t"
    )
    silent.record(5, {"top1": 60.0})
    assert len(path.read_text().splitlines()) == 1 and len(tracker.logged) == 1
