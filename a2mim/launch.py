"""Run one stage as a Submitit job and wait for it: the only module that imports submitit.

``a2mim launch [options] -- <stage> <stage args>`` is what every Snakemake rule calls. The same
command runs the stage on SLURM (``--cluster slurm``: resources per stage from the workflow
config), as a local subprocess (``local``: laptops, CI) or in this process (``debug``).

What a workflow needs from it, and how it is met:

- *A stale result is never returned.* Submitit finds a job's result by job id in its folder; local
  ids are process ids and SLURM ids restart after a state reset, so a folder left by an earlier
  run can hold a "result" for the new job's id (PITFALLS.md). Each target has its own job folder,
  cleared before submission, and each resubmission gets a fresh sub-folder.
- *Preemption and time limits resume.* ``StageJob.checkpoint`` (called by Submitit on SLURM's
  USR2 before a preemption or the time limit) requeues the same command; every stage resumes from
  ``<out>/checkpoint.pt``, so the requeued job continues where the last checkpoint left it.
  The ``scontrol requeue`` that Submitit runs for it ignores SIGTERM (``RequeueSafe``): SLURM
  signals the job's processes as soon as it requeues the job, and an ``scontrol`` still exiting
  then would die, turning a good requeue into an error result that the client reads as failure.
- *Jobs that die without a result* (node failure, ``scancel``, OOM kill) are resubmitted up to
  ``--max-retries`` times, again resuming from the run folder's checkpoint.
- *A failure is readable.* When the stage fails, the launcher exits 1 and prints the job's stderr
  tail and the paths of its full logs, so Snakemake's log of the rule shows the cause.
- *Multi-GPU / multi-node.* ``--tasks-per-node`` and ``--nodes`` start one task per process;
  inside the job Submitit's ``TorchDistributedEnvironment`` exports RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT, from which the stage builds its process group.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

Cluster = Literal["local", "slurm", "debug"]
CLUSTERS: tuple[str, ...] = ("local", "slurm", "debug")
STDERR_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """A launch that cannot start: bad options or stage arguments."""


@dataclass(frozen=True)
class LaunchConfig:
    """Where and with what resources one stage job runs."""

    job_dir: Path
    cluster: Cluster = "local"
    name: str = "a2mim"
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    timeout_min: int = 60
    signal_delay_s: int = 120  # SLURM: USR2 this long before the time limit -> checkpoint()
    max_retries: int = 2  # resubmissions after a job died without a result
    slurm_args: dict[str, str] = field(default_factory=dict)  # e.g. account, qos, constraint

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise LaunchError(f"cluster {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if int(getattr(self, name)) < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 1")
        if self.gpus_per_node < 0 or self.max_retries < 0:
            raise LaunchError("--gpus-per-node and --max-retries must be >= 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class RequeueSafe(submitit.helpers.Checkpointable):
    """A Checkpointable whose requeue survives SLURM's own SIGTERM.

    On USR2, Submitit calls ``checkpoint`` and then runs ``scontrol requeue <job id>`` from the
    signal handler. SLURM signals every process of the job as soon as the requeue is accepted,
    ``scontrol`` included; on a loaded node it may not have exited yet, dies of the SIGTERM, and
    Submitit pickles that ``CalledProcessError`` as the job's result: the client reports a failure
    while SLURM runs the requeued attempt. Ignoring SIGTERM here, right before the requeue, fixes
    it: an ignored signal stays ignored across fork and exec, so ``scontrol`` finishes (it has
    slurm.conf's KillWait, 30 s by default, before SIGKILL). This process loses nothing: Submitit
    only logs SIGTERM ("bypassing"), and it exits right after the requeue.
    (tests/slurm/test_cluster.py reproduces the race with an ``scontrol`` that lingers 2 s.)
    """

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return super().checkpoint(*args, **kwargs)


class StageJob(RequeueSafe):
    """The picklable job: ``a2mim <argv>`` in the job's process, one call per task.

    Submitit pickles this object, runs it on the node, and on preemption/time limit calls
    ``checkpoint`` (inherited), which resubmits the same object: the stage resumes from its run
    folder, so no state needs to travel in the pickle.
    """

    def __init__(self, argv: Sequence[str], threads: int = 1) -> None:
        self.argv = list(argv)
        self.threads = threads

    def __call__(self) -> int:
        import torch

        # One intra-op thread per CPU the job was given (not per core of the machine: local jobs
        # share it, and a SLURM cgroup's CPUs are fewer than the node's).
        torch.set_num_threads(self.threads)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(
            f"a2mim job {env.job_id} task {env.global_rank}/{env.num_tasks} "
            f"(restart {restarts}): a2mim {' '.join(self.argv)}",
            flush=True,
        )
        from a2mim.cli import main

        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"`a2mim {' '.join(self.argv)}` exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        print(
            "a2mim: preempted or at the time limit: requeueing; the stage resumes from its "
            "run folder's checkpoint.pt",
            flush=True,
        )
        return super().checkpoint(*args, **kwargs)


def _executor(cfg: LaunchConfig, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=cfg.cluster)
    params: dict[str, object] = {
        "name": cfg.name,
        "timeout_min": int(cfg.timeout_min),
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.tasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if cfg.cluster == "slurm":
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.slurm_args:
            params["slurm_additional_parameters"] = dict(cfg.slurm_args)
    executor.update_parameters(**params)
    return executor


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _job_logs(job: submitit.Job) -> tuple[Path, Path]:
    return Path(job.paths.stdout), Path(job.paths.stderr)


def _report_failure(job: submitit.Job, reason: str) -> None:
    out_path, err_path = _job_logs(job)
    stderr = job.stderr() or ""
    print(
        f"a2mim launch: job {job.job_id} failed: {reason}\n"
        f"--- last {STDERR_TAIL_LINES} lines of its stderr ({err_path}) ---\n"
        f"{_tail(stderr) or '(empty)'}\n"
        f"--- full logs: {out_path} and {err_path}",
        file=sys.stderr,
        flush=True,
    )


def launch(cfg: LaunchConfig, argv: Sequence[str]) -> int:
    """Submit ``a2mim <argv>``, wait, and return 0 on success, 1 on failure."""
    if cfg.job_dir.exists():
        shutil.rmtree(cfg.job_dir)
    cfg.job_dir.mkdir(parents=True)
    for attempt in range(cfg.max_retries + 1):
        executor = _executor(cfg, cfg.job_dir / f"attempt{attempt}")
        job = executor.submit(StageJob(argv, threads=cfg.cpus_per_task))
        out_path, err_path = _job_logs(job)
        print(
            f"a2mim launch: submitted job {job.job_id} ({cfg.cluster}, {cfg.world_size} task(s)); "
            f"logs: {out_path} {err_path}",
            flush=True,
        )
        started = time.monotonic()
        try:
            job.result()
        except FailedJobError as err:  # the stage raised: retrying would fail the same way
            _report_failure(job, str(err).strip().splitlines()[0] if str(err) else "error")
            return 1
        except UncompletedJobError as err:  # died without a result: cancelled, killed, lost
            reason = str(err).strip().splitlines()[0] if str(err) else "no result"
            if attempt < cfg.max_retries:
                print(
                    f"a2mim launch: job {job.job_id} ended without a result ({reason}); "
                    f"resubmitting ({attempt + 1}/{cfg.max_retries}), the stage resumes from its "
                    "checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            _report_failure(job, f"{reason}; gave up after {cfg.max_retries} resubmission(s)")
            return 1
        stdout = job.stdout() or ""
        if stdout:
            print(_tail(stdout, 200), flush=True)
        print(
            f"a2mim launch: job {job.job_id} finished in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        return 0
    return 1  # unreachable: the loop returns


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``a2mim launch`` options (shared with the CLI's help)."""
    p.add_argument("--cluster", choices=CLUSTERS, default="local", help="executor (default local)")
    p.add_argument(
        "--job-dir", required=True, type=Path, help="this target's Submitit folder (cleared first)"
    )
    p.add_argument("--name", default="a2mim", help="job name")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--timeout-min", type=int, default=60, help="time limit of one job (minutes)")
    p.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="SLURM sends USR2 this long before the limit; the job requeues itself and resumes",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="resubmissions after a job dies without a result (cancelled, killed, node lost)",
    )
    p.add_argument(
        "--slurm-arg",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. --slurm-arg account=vision --slurm-arg qos=high",
    )
    p.add_argument(
        "stage_argv",
        nargs=argparse.REMAINDER,
        metavar="-- STAGE ARGS",
        help="the stage command line, e.g. -- pretrain --config tiny --out runs/p",
    )


def config_from_args(args: argparse.Namespace) -> tuple[LaunchConfig, list[str]]:
    argv = list(args.stage_argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise LaunchError("no stage given: a2mim launch [options] -- <stage> <stage args>")
    cfg = LaunchConfig(
        job_dir=args.job_dir,
        cluster=args.cluster,
        name=args.name,
        partition=args.partition,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        signal_delay_s=args.signal_delay_s,
        max_retries=args.max_retries,
        slurm_args=dict(args.slurm_arg),
    )
    return cfg, argv
