"""The training engine: the one loop that pretrain, finetune, linprobe, detect and segment run on.

A stage supplies a :class:`Task` (its datasets, model, optimiser and schedule, batches, loss,
evaluation and final files); :func:`train` does the rest, the same way for every stage:

- the process: rank, device, the deterministic block, ``torch.manual_seed(seed)`` before the
  model is built, the DDP wrap of the trained module;
- the run folder (`a2mim.train.rundir.open_run`): resume state, ``resolved_config.yaml`` with
  the derived values (global batch, accumulation steps, scaled lr, steps), the MLflow run;
- each optimizer step: the train mode, a seed drawn from ``(seed, step)``, ``accum_steps``
  micro-batches under autocast (one amp-dtype table, :data:`AMP_DTYPES`) with the grad scaler,
  the loss parts averaged over micro-batches and ranks, a non-finite loss check, clipping, the
  update, the scheduler (``step_update``), the per-step log (`a2mim.train.steplog.TrainLog`);
- the cadence: evaluations when the task says they are due, then the checkpoint every
  ``ckpt_every_steps`` (an evaluation comes before the checkpoint of its step, so a resumed run
  never skips one), save-on-signal (`a2mim.train.preemption`), and at the end the final
  evaluation, the last checkpoint, the task's final files and ``metrics.json``.

Save-on-signal: after every optimizer step, when :func:`a2mim.train.preemption.requested` is set
(on any rank), the checkpoint of that step is written (atomically, as the cadence does) and
:class:`~a2mim.train.preemption.Preempted` is raised. An evaluation checks the request between
batches and aborts; the checkpoint then records the evaluation as pending and the resumed run
does it first, so nothing is skipped and the final weights are those of an uninterrupted run.

Restarting the same command on the same folder resumes from ``checkpoint.pt``; on the CPU in
deterministic mode the final weights are bit-identical to an uninterrupted run (every random
draw of a step is seeded from ``(seed, step)``, every sample's augmentation from its position).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from a2mim import atomic
from a2mim.config import ConfigError
from a2mim.train import checkpoint, preemption, steplog
from a2mim.train.distributed import mean_over_ranks, rank_seed, resolve_device, world_info
from a2mim.train.rundir import config_hash, open_run
from a2mim.train.sampling import EpochSampler, mix_seed

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

__all__ = [
    "AMP_DTYPES",
    "Context",
    "Steps",
    "Task",
    "accumulation",
    "epoch_steps",
    "interruptible",
    "stage_runner",
    "train",
]


@dataclass(frozen=True)
class Context:
    """Where a run happens: its folder, this process's rank, the world size, the device and
    the autocast dtype (None: full precision)."""

    out: Path
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self) -> torch.autocast:
        """The forward's autocast context (disabled without an amp dtype)."""
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def ddp(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel under a process group, else itself."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)


@dataclass(frozen=True)
class Steps:
    """The step plan of a run: ``total`` optimizer steps of ``global_batch`` samples (all
    processes, ``accum_steps`` micro-batches each); ``per_epoch`` steps an epoch, or None for a
    stream without epochs."""

    total: int
    global_batch: int
    accum_steps: int
    per_epoch: int | None
    stop: int | None = None  # `max_steps`: the run ends here; the schedule still spans `total`

    @property
    def end(self) -> int:
        """The step the run ends at: ``total``, or ``max_steps`` when that is fewer."""
        return self.total if self.stop is None else min(self.stop, self.total)

    def segment_end(self, step: int) -> int:
        """The step where the data iterator started at ``step`` ends (its epoch's end)."""
        if self.per_epoch is None:
            return self.end
        return min((step // self.per_epoch + 1) * self.per_epoch, self.end)

    def epoch(self, done: int) -> float:
        """Epochs done after ``done`` steps (fractional)."""
        epoch = (done - 1) // self.per_epoch
        return epoch + (done - epoch * self.per_epoch) / self.per_epoch


def accumulation(cfg: Any, world: int) -> int:
    """The micro-batches per optimizer step: ``cfg.accum_steps``, or, when ``cfg.global_batch``
    is set, ``global_batch / (world * batch_size)`` (a ``ConfigError`` naming the fix when it
    does not divide, or when it contradicts an explicit ``accum_steps``)."""
    if cfg.global_batch is None:
        return cfg.accum_steps
    per_step = world * cfg.batch_size
    accum, rest = divmod(cfg.global_batch, per_step)
    if rest or accum == 0:
        raise ConfigError(
            f"global_batch={cfg.global_batch} is not a multiple of batch_size x processes = "
            f"{cfg.batch_size} x {world} = {per_step}: set global_batch to a multiple of "
            f"{per_step}, or change batch_size or the number of processes"
        )
    if cfg.accum_steps not in (1, accum):
        raise ConfigError(
            f"accum_steps={cfg.accum_steps} contradicts global_batch={cfg.global_batch} "
            f"(which gives {accum} with batch_size {cfg.batch_size} x {world} processes): set "
            f"one of them"
        )
    return accum


def epoch_steps(num: int, global_batch: int, what: str) -> int:
    """Optimizer steps per epoch over ``num`` samples; a ``ConfigError`` when there is not
    one global batch of them (``what`` names the data)."""
    steps = num // global_batch
    if steps == 0:
        raise ConfigError(
            f"{what} has {num} images, fewer than one global batch of {global_batch} "
            f"(batch_size x accum_steps x processes): lower batch_size"
        )
    return steps


def interruptible(items: Iterable) -> Iterator:
    """``items``, stopping with `Preempted` as soon as a save-on-signal request is pending (an
    evaluation loop wraps its batches in it; the evaluation is redone after the resume)."""
    for item in items:
        if preemption.requested():
            raise preemption.Preempted(f"evaluation stopped: {preemption.requested()}")
        yield item


class Task:
    """What a stage supplies to :func:`train`. ``cfg`` is the stage's frozen config (with the
    run-control fields of `a2mim.config.RunConfig`). The engine calls, in order:
    :meth:`prepare` (datasets; errors before any output), :meth:`build` (with the global
    generator seeded: model, ``optimizer``, ``scheduler``), :meth:`derived` / :meth:`tags`,
    then per step :meth:`batches`, :meth:`step_seed`, :meth:`loss`, :meth:`after_update`, and
    the cadence hooks. The defaults fit a task whose :attr:`model` is the trained module."""

    stage: str = "stage"
    static_shapes = True  # every batch has one shape: cudnn.benchmark when not deterministic
    loss_format = ".4f"
    nonfinite_hint = "lower the lr or disable fp16"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler (``step_update``, ``state_dict``, ``load_state_dict``)
    lr: float

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._loaders: dict[int, tuple[_OrderSlot, DataLoader]] = {}  # by dataset object
        self.ctx: Context  # set by the engine before prepare
        self.steps: Steps  # set by the engine after prepare
        self.config_hash: str  # set by the engine before the run folder opens
        self.tracker: Any  # the MLflow tracker (a2mim.tracking.Tracker), set with it

    # ------------------------------------------------------------------ setting up
    def prepare(self, accum_steps: int) -> Steps:
        """Open the datasets and return the step plan."""
        raise NotImplementedError

    def build(self) -> None:
        """Build ``model`` (on the device), ``optimizer``, ``scheduler`` and set ``lr``."""
        raise NotImplementedError

    def derived(self) -> dict[str, Any]:
        """Stage-specific derived values for ``resolved_config.yaml`` and MLflow."""
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def tracked(self, derived: dict[str, Any]) -> dict[str, Any] | None:
        """The part of ``derived`` logged as MLflow params (None: all of it)."""
        return None

    def hashed_config(self) -> Any:
        """The config whose hash identifies the run (the resolved one)."""
        return self.cfg

    def train_module(self) -> nn.Module:
        """The module whose gradients DDP averages."""
        return self.model

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        """Checkpoint entries beyond optimizer, scheduler, scaler and step."""
        return {"model": self.model.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

    # ------------------------------------------------------------------ a step
    def batches(self, step: int) -> Iterator[Any]:
        """The micro-batches from ``step`` to ``steps.segment_end(step)``."""
        raise NotImplementedError

    def epoch_batches(
        self, step: int, dataset: Any, num: int, sampler: type = EpochSampler, **kw: Any
    ) -> Iterator[Any]:
        """The micro-batches of ``step``'s epoch from its position: ``sampler`` (the seeded
        order of ``num`` samples, this rank's share, truncated to whole global batches; ``kw``
        that start with ``sampler_`` go to it) over ``dataset`` (``kw``: DataLoader options)."""
        cfg, ctx, steps = self.cfg, self.ctx, self.steps
        epoch, pos = divmod(step, steps.per_epoch)
        order = sampler(
            num,
            cfg.seed,
            epoch,
            start=pos * cfg.batch_size * steps.accum_steps,
            rank=ctx.rank,
            world_size=ctx.world,
            usable=steps.per_epoch * steps.global_batch,
            **{k.removeprefix("sampler_"): v for k, v in kw.items() if k.startswith("sampler_")},
        )
        if id(dataset) not in self._loaders:  # one loader per dataset: workers persist
            loader_kw = {k: v for k, v in kw.items() if not k.startswith("sampler_")}
            slot = _OrderSlot()
            workers = cfg.data.num_workers
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                sampler=slot,
                num_workers=workers,
                drop_last=True,
                persistent_workers=workers > 0,
                pin_memory=ctx.device.type == "cuda",  # for the loops' non_blocking copies
                **loader_kw,
            )
            self._loaders[id(dataset)] = (slot, loader)
        slot, loader = self._loaders[id(dataset)]
        slot.order = order
        return iter(loader)

    def train_mode(self) -> None:
        self.model.train()

    def step_seed(self, step: int) -> int:
        """The global torch seed of ``step`` (drop path, dropout): per rank."""
        return rank_seed(mix_seed(self.cfg.seed, 1, step), self.ctx.rank)

    def loss(
        self, train_model: nn.Module, batch: Any, step: int, micro: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to back-propagate, logged parts)``; the parts' first entry is the loss."""
        raise NotImplementedError

    @property
    def grad_clip(self) -> float | None:
        return self.cfg.optim.grad_clip

    def clip_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def after_update(self, done: int) -> None:
        """After the optimizer step (an EMA update)."""

    def logged_lr(self, step: int) -> float:
        """The lr of the log line of ``step`` (after the scheduler's update)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def progress(self, done: int) -> dict[str, float]:
        """Extra values of a log line (the fractional epoch)."""
        return {"epoch": self.steps.epoch(done)}

    # ------------------------------------------------------------------ evaluation, the end
    def eval_due(self, done: int) -> bool:
        """Whether an evaluation runs after step ``done`` (< total; the last one always)."""
        return False

    def evaluate(self, done: int) -> dict[str, float] | None:
        """Evaluate (every rank); the row logged at ``done``, or None for nothing to log."""
        return None

    def record_extras(self, done: int) -> dict[str, float]:
        """Values written with an evaluation row to ``metrics.jsonl`` only."""
        return {}

    def final_metrics(self, last_eval: dict | None, last_log: dict) -> dict[str, Any]:
        """``metrics.json`` from the final evaluation row and the last logged step."""
        return {**(last_eval or {}), **({"final_loss": last_log["loss"]} if last_log else {})}

    def write_final(self, metrics: dict[str, Any]) -> list[tuple[Path, str | None]]:
        """Write the final files (rank 0); returns the ``(path, artifact folder)`` to log."""
        return []


class _OrderSlot(torch.utils.data.Sampler):
    """The sampler of a persistent DataLoader: iterates the order set last (a DataLoader's
    sampler cannot be replaced, and rebuilding the loader would restart its workers)."""

    def __init__(self) -> None:
        self.order: Any = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _deterministic(device: torch.device) -> None:
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = False


def _preemption_requested(ctx: Context) -> bool:
    """Whether any rank was asked to save and stop (every rank gets the same answer)."""
    if ctx.world == 1:
        return preemption.requested() is not None
    flag = torch.tensor([float(preemption.requested() is not None)], device=ctx.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def stage_runner(task_type: type[Task]):
    """A stage's ``run(cfg, out_dir, stop_after_steps=None) -> metrics``: :func:`train` of a
    ``task_type`` task."""

    def run(cfg: Any, out_dir: str | Path, stop_after_steps: int | None = None) -> dict[str, Any]:
        return train(task_type(cfg), out_dir, stop_after_steps)

    run.__doc__ = (
        f"Train (or resume) a {task_type.stage} run into ``out_dir``; returns the final metrics "
        "(``stop_after_steps``: see `a2mim.train.engine.train`)."
    )
    return run


def train(task: Task, out_dir: str | Path, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``task`` into ``out_dir`` (or resume it); returns the final metrics.

    ``stop_after_steps`` (tests) returns ``{"stopped_at_step": n}`` right after that many
    optimizer steps, with nothing written beyond the periodic checkpoints, as if the process
    had been killed there.
    """
    cfg = task.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    device = resolve_device(cfg.device)
    # null (detect's default): deterministic on the CPU, fast kernels on CUDA
    if cfg.deterministic or (cfg.deterministic is None and device.type == "cpu"):
        _deterministic(device)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = task.static_shapes  # fastest kernels for the shapes
    task.ctx = Context(out, rank, world, device, AMP_DTYPES[cfg.amp])
    task.steps = steps = dataclasses.replace(
        task.prepare(accumulation(cfg, world)), stop=cfg.max_steps
    )
    torch.manual_seed(cfg.seed)
    task.build()
    derived = {
        "global_batch": steps.global_batch,
        "accum_steps": steps.accum_steps,
        "lr": task.lr,
        **({"steps_per_epoch": steps.per_epoch} if steps.per_epoch is not None else {}),
        "total_steps": steps.total,
        **({"stop_at_step": steps.end} if steps.end < steps.total else {}),
        "world_size": world,
        **task.derived(),
        "config_hash": config_hash(task.hashed_config()),
    }
    task.config_hash = derived["config_hash"]
    state, tracker = open_run(
        task.stage, cfg, out, derived, task.tags(), rank, tracked=task.tracked(derived)
    )
    task.tracker = tracker
    with tracker:
        if rank == 0:
            tracker.log_artifact(out / "resolved_config.yaml")
        return _Loop(task, derived, tracker).run(state, stop_after_steps)


class _Loop:
    """The state of one :func:`train` call: the task, scaler, DDP module, log and tracker."""

    def __init__(self, task: Task, derived: dict[str, Any], tracker):
        self.task, self.derived, self.tracker = task, derived, tracker
        self.ctx, self.steps = task.ctx, task.steps
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=task.cfg.amp == "fp16")
        self.train_model = self.ctx.ddp(task.train_module())
        if task.cfg.compile:  # the loss's forward, compiled (torch.compile, inductor)
            self.train_model = torch.compile(self.train_model)
        self.log: steplog.TrainLog

    def save(self, done: int, eval_pending: bool = False) -> None:
        """The checkpoint of step ``done`` (rank 0, atomic), after the metrics up to it."""
        if self.ctx.rank != 0:
            return
        self.tracker.flush()
        task = self.task
        ckpt = {
            **task.state(),
            "optimizer": task.optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": done,
            "config_hash": self.derived["config_hash"],
        }
        if eval_pending:
            ckpt["eval_pending"] = True
        checkpoint.atomic_save(ckpt, self.ctx.out / "checkpoint.pt")

    def resume(self, state: dict[str, Any] | None) -> int:
        if state is None:
            return 0
        task = self.task
        task.load_state(state)
        task.optimizer.load_state_dict(state["optimizer"])
        task.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        steplog.truncate(self.ctx.out / "metrics.jsonl", step)
        return step

    def evaluate(self, done: int) -> dict[str, float] | None:
        """The task's evaluation, logged; a preemption during it saves the checkpoint of
        ``done`` with the evaluation pending and stops."""
        try:
            row = self.task.evaluate(done)
        except preemption.Preempted:
            self.save(done, eval_pending=True)
            self.stop("KILLED")
            raise
        if row is not None:
            self.log.record(done, row, **self.task.record_extras(done))
        return row

    def stop(self, status: str) -> None:
        self.log.close()
        self.tracker.close(status)  # a restart sets the run RUNNING again

    def run(self, state: dict[str, Any] | None, stop_after_steps: int | None) -> dict[str, Any]:
        task, steps, ctx = self.task, self.steps, self.ctx
        step = self.resume(state)
        task.scheduler.step_update(step)
        self.log = steplog.TrainLog.of_stage(
            task.cfg,
            ctx.out,
            self.tracker,
            steps.end,
            step,
            ctx.rank,
            task.stage,
            loss_format=task.loss_format,
        )
        if state is not None and state.get("eval_pending") and step < steps.end:
            self.evaluate(step)
        while step < steps.end:
            batches = task.batches(step)
            for step in range(step, steps.segment_end(step)):  # noqa: B020
                done = self.step(batches, step)
                if done < steps.end:
                    if task.eval_due(done):
                        self.evaluate(done)
                    if done % task.cfg.ckpt_every_steps == 0:
                        self.save(done)
                if stop_after_steps is not None and done >= stop_after_steps:
                    self.stop("KILLED")
                    return {"stopped_at_step": float(done)}
                if _preemption_requested(ctx):
                    if done % task.cfg.ckpt_every_steps or done == steps.total:
                        self.save(done)
                    self.stop("KILLED")
                    raise preemption.Preempted(
                        f"{task.stage}: saved step {done} of {steps.total} on request "
                        f"({preemption.requested() or 'another rank'}); rerun to resume"
                    )
            step = steps.segment_end(step)
        self.log.close()
        last_eval = self.evaluate(steps.end)
        self.save(steps.end)
        metrics = task.final_metrics(last_eval, self.log.last)
        if ctx.rank == 0:
            artifacts = task.write_final(metrics)
            atomic.write_text(ctx.out / "metrics.json", json.dumps(metrics, indent=2))
            for path, folder in [*artifacts, (ctx.out / "metrics.json", None)]:
                self.tracker.log_artifact(path, folder)
        return metrics

    def step(self, batches: Iterator[Any], step: int) -> int:
        """One optimizer step (``accum_steps`` micro-batches); returns the steps done."""
        task, accum = self.task, self.steps.accum_steps
        task.train_mode()
        torch.manual_seed(task.step_seed(step))
        sums = None
        for micro in range(accum):
            loss, parts = task.loss(self.train_model, next(batches), step, micro)
            self.scaler.scale(loss / accum).backward()
            part_k = torch.stack([p.detach().double() for p in parts.values()]) / accum
            sums = part_k if sums is None else sums + part_k
        # the mean over ranks: every rank gets the same values, so all stop together
        values = dict(zip(parts, mean_over_ranks(sums).tolist(), strict=True))
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(
                f"non-finite loss {values} at step {step}; {task.nonfinite_hint}"
            )
        if task.grad_clip is not None:
            self.scaler.unscale_(task.optimizer)
            nn.utils.clip_grad_norm_(task.clip_parameters(), task.grad_clip)
        self.scaler.step(task.optimizer)
        self.scaler.update()
        task.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        task.after_update(done)
        task.scheduler.step_update(done)
        row = {**values, "lr": task.logged_lr(step), **task.progress(done)}
        self.log.step(done, self.steps.global_batch, row)
        return done
