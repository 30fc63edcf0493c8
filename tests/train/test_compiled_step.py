"""``compile: true`` (torch.compile of the trained module) gives the losses of the eager step.

Tolerance: the losses of every step agree within ``rtol=1e-4, atol=1e-6`` (inductor fuses and
reorders fp32 reductions, so bit equality is not expected; the differences measured on CPU are
~1e-7 relative). No dropout / drop path in these models: compiled graphs draw random numbers
from their own generator, so a stochastic layer would differ by design, not by error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from a2mim.config import RunConfig, bounded
from a2mim.mim import MaskedImageModel, get_preset
from a2mim.train import engine
from a2mim.train.optim import OptimConfig, build_scheduler
from a2mim.train.sampling import mix_seed

RTOL, ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class TinyConfig(RunConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_epochs=0.5))
    epochs: int = bounded(2, ge=1)
    samples: int = 32


class TinyTask(engine.Task):
    """Regression with a small MLP (no dropout) and AdamW."""

    stage = "tiny"

    def prepare(self, accum_steps):
        global_batch = self.cfg.batch_size * self.ctx.world * accum_steps
        per_epoch = engine.epoch_steps(self.cfg.samples, global_batch, "tiny")
        gen = torch.Generator().manual_seed(7)
        self.x_nd = torch.randn(self.cfg.samples, 4, generator=gen)
        self.y_n = torch.sin(self.x_nd @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        return engine.Steps(self.cfg.epochs * per_epoch, global_batch, accum_steps, per_epoch)

    def build(self):
        self.lr = 0.01
        self.model = nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Linear(32, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        steps = self.steps
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.optim, steps.total, steps.per_epoch
        )

    def batches(self, step):
        for s in range(step, self.steps.segment_end(step)):
            for micro in range(self.steps.accum_steps):
                gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, s, micro))
                idx = torch.randint(self.cfg.samples, (self.cfg.batch_size,), generator=gen)
                yield self.x_nd[idx], self.y_n[idx]

    def loss(self, train_model, batch, step, micro):
        x_bd, y_b = batch
        loss = ((train_model(x_bd).squeeze(1) - y_b) ** 2).mean()
        return loss, {"loss": loss}


def _losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_engine_compile_switch_gives_the_eager_losses(tmp_path):
    base = {"batch_size": 8, "track": False, "progress": False, "log_every_steps": 1}
    eager = TinyTask(TinyConfig(**base))
    engine.train(eager, tmp_path / "eager")
    compiled = TinyTask(TinyConfig(**base, compile=True))
    engine.train(compiled, tmp_path / "compiled")
    assert not isinstance(eager.model, torch._dynamo.eval_frame.OptimizedModule)
    got, want = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert len(got) == len(want) == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=ATOL)
    assert len(set(got)) > 1  # the steps changed the model: the comparison covers updates


@pytest.mark.slow
def test_compiled_a2mim_step_gives_the_eager_loss():
    """Three A²MIM training steps (ResNet-18 preset, 32 px: mask, fill, token, decoder, spatial
    and frequency loss, backward, AdamW), eager and under torch.compile, from one init."""
    cfg = get_preset("a2mim_resnet18")
    gen = torch.Generator().manual_seed(0)
    img_bchw = torch.randn(8, 3, cfg.img_size, cfg.img_size, generator=gen)

    def run(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = MaskedImageModel(cfg).train()
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
        masks = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            loss = forward(img_bchw, model.masker(8, generator=masks)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    eager, compiled = run(False), run(True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=RTOL, atol=ATOL)
    assert eager[0] != eager[-1]  # the steps changed the model: the comparison covers updates
