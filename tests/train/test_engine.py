"""The training engine on a toy task (seconds): save-on-signal after step k and during an
evaluation, exact resume, gradient accumulation from ``global_batch``, the non-finite check."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from torch import nn

from a2mim.config import ConfigError, RunConfig, bounded, from_dict
from a2mim.train import checkpoint, engine, preemption
from a2mim.train.optim import OptimConfig, build_scheduler
from a2mim.train.rundir import read_run
from a2mim.train.sampling import mix_seed


@dataclass(frozen=True)
class ToyConfig(RunConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_epochs=0.5))
    epochs: int = bounded(3, ge=1)
    samples: int = 32


class ToyTask(engine.Task):
    """Regression with dropout (so the per-step seed matters) and SGD with momentum; the
    "evaluation" is the loss on fixed data every epoch. ``request_at`` asks for a save-and-stop
    after that step; ``request_in_eval`` during the evaluation of that step."""

    stage = "toy"

    def __init__(self, cfg, request_at=None, request_in_eval=None, poison_at=None):
        super().__init__(cfg)
        self.request_at, self.request_in_eval, self.poison_at = (
            request_at,
            request_in_eval,
            poison_at,
        )
        gen = torch.Generator().manual_seed(7)
        self.x_nd = torch.randn(cfg.samples, 4, generator=gen)
        self.y_n = self.x_nd @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.evaluated: list[int] = []

    def prepare(self, accum_steps):
        global_batch = self.cfg.batch_size * self.ctx.world * accum_steps
        per_epoch = engine.epoch_steps(self.cfg.samples, global_batch, "toy")
        return engine.Steps(self.cfg.epochs * per_epoch, global_batch, accum_steps, per_epoch)

    def build(self):
        self.lr = 0.01
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.5)
        steps = self.steps
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.optim, steps.total, steps.per_epoch
        )

    def batches(self, step):
        end = self.steps.segment_end(step)
        for s in range(step, end):
            for micro in range(self.steps.accum_steps):
                gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, s, micro))
                idx = torch.randint(self.cfg.samples, (self.cfg.batch_size,), generator=gen)
                yield self.x_nd[idx], self.y_n[idx]

    def loss(self, train_model, batch, step, micro):
        x_bd, y_b = batch
        loss = ((train_model(x_bd).squeeze(1) - y_b) ** 2).mean()
        if self.poison_at == step:
            loss = loss * float("nan")
        return loss, {"loss": loss}

    def after_update(self, done):
        if done == self.request_at:
            preemption.request("test")

    def eval_due(self, done):
        return done % self.steps.per_epoch == 0

    @torch.no_grad()
    def evaluate(self, done):
        self.model.eval()
        for i in engine.interruptible(range(2)):
            if done == self.request_in_eval and i == 0:
                preemption.request("test")
        self.evaluated.append(done)
        return {"val_loss": float(((self.model(self.x_nd).squeeze(1) - self.y_n) ** 2).mean())}

    def write_final(self, metrics):
        checkpoint.atomic_save({"state_dict": self.model.state_dict()}, self.ctx.out / "model.pt")
        return []


def _cfg(**over) -> ToyConfig:
    base = {"batch_size": 4, "ckpt_every_steps": 5, "log_every_steps": 1, "progress": False}
    return from_dict(ToyConfig, {**base, "track": False, "device": "cpu", **over})


@pytest.fixture(autouse=True)
def _no_pending_request():
    preemption.reset()
    yield
    preemption.reset()


def _lines(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]


def _weights(out) -> dict[str, torch.Tensor]:
    return checkpoint.load(out / "model.pt")["state_dict"]


def _same_run(a, b) -> None:
    assert _lines(a) == _lines(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "metrics.json").read_text()) == json.loads(
        (b / "metrics.json").read_text()
    )


def test_preemption_after_step_k_saves_step_k_and_resumes_bit_identical(tmp_path):
    engine.train(ToyTask(_cfg()), tmp_path / "full")
    cut = tmp_path / "cut"
    with pytest.raises(preemption.Preempted, match="saved step 3 of 24"):
        engine.train(ToyTask(_cfg(), request_at=3), cut)
    state = checkpoint.load(cut / "checkpoint.pt")
    assert state["step"] == 3 and "eval_pending" not in state  # not a cadence step (5)
    assert [row["step"] for row in _lines(cut)] == [1, 2, 3]
    assert not (cut / "metrics.json").exists() and not (cut / "model.pt").exists()
    preemption.reset()  # the requeued job is a new process
    engine.train(ToyTask(_cfg()), cut)  # the same command resumes
    _same_run(tmp_path / "full", cut)


def test_preemption_during_an_evaluation_redoes_it_after_resume(tmp_path):
    engine.train(ToyTask(_cfg()), tmp_path / "full")
    cut = tmp_path / "cut"
    with pytest.raises(preemption.Preempted, match="evaluation stopped"):
        engine.train(ToyTask(_cfg(), request_in_eval=8), cut)
    state = checkpoint.load(cut / "checkpoint.pt")
    assert state["step"] == 8 and state["eval_pending"]
    assert all("val_loss" not in row for row in _lines(cut))
    preemption.reset()
    resumed = ToyTask(_cfg())
    engine.train(resumed, cut)
    assert resumed.evaluated == [8, 16, 24]  # the interrupted evaluation first
    _same_run(tmp_path / "full", cut)


def test_global_batch_sets_the_accumulation_steps(tmp_path):
    task = ToyTask(_cfg(global_batch=8))
    engine.train(task, tmp_path / "run")
    derived = task.steps
    assert (derived.accum_steps, derived.global_batch, derived.total) == (2, 8, 12)
    assert engine.accumulation(_cfg(global_batch=16), world=2) == 2
    with pytest.raises(ConfigError, match=r"global_batch=10 is not a multiple of .* = 4"):
        engine.accumulation(_cfg(global_batch=10), world=1)
    with pytest.raises(ConfigError, match="accum_steps=3 contradicts global_batch=8"):
        engine.accumulation(_cfg(global_batch=8, accum_steps=3), world=1)
    # the same images per step through accumulation or a larger batch: the same run
    engine.train(ToyTask(_cfg(accum_steps=2)), tmp_path / "accum")
    assert _lines(tmp_path / "run") == _lines(tmp_path / "accum")


def test_non_finite_loss_stops_the_run(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 2; lower the lr"):
        engine.train(ToyTask(_cfg(), poison_at=2), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_finished_run_of_another_config_is_kept_even_without_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    engine.train(ToyTask(_cfg()), out)
    with pytest.raises(ConfigError, match="different config"):
        engine.train(ToyTask(_cfg(seed=1)), out)
    (out / "checkpoint.pt").unlink()  # what the old hint said to do
    before = (out / "resolved_config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"different config .* delete the folder"):
        engine.train(ToyTask(_cfg(seed=1)), out)
    assert (out / "resolved_config.yaml").read_text() == before
    engine.train(ToyTask(_cfg()), out)  # the same config again: its results stand


def test_derived_values_are_saved_and_logged_as_mlflow_params(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    engine.train(ToyTask(_cfg(global_batch=8, track=True, tracking_uri=uri)), tmp_path / "run")
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    derived = resolved["derived"]
    assert (derived["accum_steps"], derived["global_batch"], derived["total_steps"]) == (2, 8, 12)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = run.data.params
    assert params["global_batch"] == "8" and params["derived.accum_steps"] == "2"
    assert params["derived.lr"] == str(derived["lr"])
    assert params["derived.total_steps"] == "12"
    record = read_run(tmp_path / "run")
    assert (record.stage, record.finished, record.mlflow_run_id) == ("toy", True, run.info.run_id)
    assert record.derived == derived and record.config["global_batch"] == 8
    assert record.metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_max_steps_ends_the_run_early_on_the_full_runs_schedule(tmp_path):
    """`max_steps` stops after that many steps with the final evaluation and outputs; the steps
    taken are the full run's first ones (same losses, same lr: the schedule spans the run)."""
    engine.train(ToyTask(_cfg()), tmp_path / "full")
    short = ToyTask(_cfg(max_steps=5))
    engine.train(short, tmp_path / "short")
    assert short.evaluated == [5]  # not an epoch boundary (8): the end's evaluation
    rows = _lines(tmp_path / "short")
    full = {row["step"]: row for row in _lines(tmp_path / "full")}
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5]
    assert all(row["loss"] == full[row["step"]]["loss"] for row in rows if "loss" in row)
    assert all(row["lr"] == full[row["step"]]["lr"] for row in rows if "lr" in row)
    assert "val_loss" in json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert (tmp_path / "short" / "model.pt").is_file()
    derived = yaml.safe_load((tmp_path / "short" / "resolved_config.yaml").read_text())["derived"]
    assert (derived["total_steps"], derived["stop_at_step"]) == (24, 5)
    assert checkpoint.load(tmp_path / "short" / "checkpoint.pt")["step"] == 5
