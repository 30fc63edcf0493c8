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
- *A bad command fails before it is queued.* ``a2mim check`` (in a child process) validates the
  stage command, its data and its init before anything is submitted. The workflow's rules pass
  ``--preflighted`` (its pre-flight checked every command when it planned the DAG); with an
  executor that starts the job at once (``local``, ``debug``), whose stage runs the same checks
  as its first step, the launcher then does not check a second time (a stage module's import
  costs seconds of CPU per job). On SLURM it always checks: a job can wait hours in the queue.
- *A failure is readable.* When the stage fails, the launcher exits 1 and prints the job's stderr
  tail and the paths of its full logs, so Snakemake's log of the rule shows the cause.
- *Multi-GPU / multi-node.* ``--tasks-per-node`` and ``--nodes`` start one task per process;
  inside the job Submitit's ``TorchDistributedEnvironment`` exports RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT, from which the stage builds its process group.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from a2mim.registry import Resources

Cluster = Literal["local", "slurm", "debug"]
CLUSTERS: tuple[str, ...] = ("local", "slurm", "debug")
IMMEDIATE_CLUSTERS: tuple[str, ...] = ("local", "debug")  # the job starts when submitted
STDERR_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """A launch that cannot start: bad options or stage arguments."""


MARKER = ".a2mim-launch"  # in every job folder this launcher made: only those are cleared


@dataclass(frozen=True)
class LaunchConfig:
    """Where and with what resources one stage job runs (defaults: ``registry.Resources``)."""

    job_dir: Path
    cluster: Cluster = "local"
    name: str = "a2mim"
    resources: Resources = field(default_factory=Resources)
    preflighted: bool = False  # the workflow's pre-flight checked the command (see the module doc)

    def __post_init__(self) -> None:
        res = self.resources
        if self.cluster not in CLUSTERS:
            raise LaunchError(f"cluster {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if int(getattr(res, name)) < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 1")
        if min(res.gpus_per_node, res.max_retries, res.max_requeues, res.signal_delay_s) < 0:
            raise LaunchError(
                "--gpus-per-node, --max-retries, --max-requeues and --signal-delay-s must be >= 0"
            )
        if res.mem_gb is not None and res.mem_gb <= 0:
            raise LaunchError("--mem-gb must be > 0")

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.tasks_per_node


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

    Save on signal: SLURM's USR2 (``signal_delay_s`` before the time limit, or a preemption) and
    SIGTERM only ask the stage to stop (:func:`a2mim.train.preemption.request`); the training
    engine writes the checkpoint of the step it is in and raises ``Preempted``. After USR2 the
    job then hands over to Submitit's own handler, which calls :meth:`checkpoint` and requeues
    the job: it resumes from that checkpoint, losing at most the step in flight. After SIGTERM
    (a cancellation, or a kill without warning) the job exits without a result: the launcher
    resubmits it (``max_retries``) and it resumes the same way; its MLflow run is marked KILLED.
    Should the stage not stop in time (a long evaluation, or a stage without save-on-signal),
    a fallback fires: after USR2, Submitit's requeue from the last regular checkpoint after
    half of ``signal_delay_s``; after SIGTERM, a KeyboardInterrupt after ``SIGTERM_GRACE_S``.
    """

    def __init__(self, argv: Sequence[str], threads: int = 1, signal_delay_s: int = 120) -> None:
        self.argv = list(argv)
        self.threads = threads
        self.signal_delay_s = signal_delay_s

    def __call__(self) -> int:
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # not Snakemake's 0 of a waiting rule
        import torch

        from a2mim import command
        from a2mim.train import preemption

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
        args = command.parse(self.argv)
        requeue = _SaveOnSignal(self.signal_delay_s).install()
        try:
            metrics = command.run(args)
        except preemption.Preempted as stopped:
            reason = preemption.requested()
            print(f"a2mim: {stopped}", flush=True)
            _disarm()
            if reason == "SIGUSR2" and requeue is not None:
                requeue(signal.SIGUSR2, None)  # Submitit: checkpoint(), requeue, exit (rank 0)
            if env.global_rank != 0:
                time.sleep(60)  # rank 0 requeues the job; SLURM then ends this task
            sys.exit(143)  # no result: the launcher resubmits, the stage resumes
        finally:
            _disarm()  # a fallback alarm must not outlive the stage (it would kill the exit)
        print(json.dumps(metrics, indent=2), flush=True)
        if os.environ.get("SUBMITIT_EXECUTOR") in ("local", "slurm"):  # a job process of its own
            atexit.register(_exit_after_result, env.paths.result_pickle)
        return 0

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        print(
            "a2mim: preempted or at the time limit: requeueing; the stage resumes from its "
            "run folder's checkpoint.pt",
            flush=True,
        )
        return super().checkpoint(*args, **kwargs)


def _exit_after_result(result: Path) -> None:
    """At the exit of a job process whose result Submitit has written: flush the logs and end
    the process without the interpreter's teardown of torch, timm and MLflow (2.5-2.8 s of CPU
    per job here, while the launcher, and Snakemake behind it, wait for the process to end).
    The stage has closed its files, checkpoints and MLflow run by then; without a result file
    (Submitit failed to write it) the process exits the normal way, with its error code."""
    if not result.exists():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _disarm() -> None:
    """After the stage: no fallback alarm, and a USR2 now has nothing to save. Ignoring it also
    covers the interpreter's exit, where Python's handlers are already reset to the default
    (terminate): a job that ends just before its time limit is not killed by the warning."""
    signal.alarm(0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


SIGTERM_GRACE_S = 25  # SIGTERM -> stop: SLURM's KillWait (30 s by default) leaves this much


class _SaveOnSignal:
    """Signal handlers that only ask the stage to save and stop (plus the fallbacks above)."""

    def __init__(self, signal_delay_s: int) -> None:
        self.signal_delay_s = signal_delay_s
        self.requeue = None

    def install(self):
        """Install USR2 and SIGTERM handlers; returns Submitit's USR2 handler (or None)."""
        previous = signal.getsignal(signal.SIGUSR2)
        self.requeue = previous if callable(previous) else None
        signal.signal(signal.SIGUSR2, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)
        return self.requeue

    def _on_signal(self, signum: int, frame) -> None:
        from a2mim.train import preemption

        name = signal.Signals(signum).name
        if preemption.requested() is None or name == "SIGUSR2":
            preemption.request(name)
            delay = SIGTERM_GRACE_S if name == "SIGTERM" else max(self.signal_delay_s // 2, 5)
            signal.alarm(delay)

    def _on_alarm(self, signum: int, frame) -> None:
        from a2mim.train import preemption

        reason = preemption.requested()
        if reason == "SIGUSR2" and self.requeue is not None:
            print("a2mim: the stage did not save in time: requeueing from its last checkpoint")
            self.requeue(signal.SIGUSR2, frame)
        raise KeyboardInterrupt(f"{reason}: the stage did not stop within its grace time")


def _executor(cfg: LaunchConfig, folder: Path) -> submitit.AutoExecutor:
    res = cfg.resources
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cfg.cluster, slurm_max_num_timeout=res.max_requeues
    )
    params: dict[str, object] = {
        "name": cfg.name,
        "timeout_min": int(res.timeout_min),
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem_gb"] = res.mem_gb
    if cfg.cluster == "slurm":
        params["slurm_signal_delay_s"] = res.signal_delay_s
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.slurm_args:
            params["slurm_additional_parameters"] = dict(res.slurm_args)
    executor.update_parameters(**params)
    return executor


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _job_logs(job: submitit.Job) -> tuple[Path, Path]:
    return Path(job.paths.stdout), Path(job.paths.stderr)


def _report_failure(job: submitit.Job, reason: str) -> None:
    out_path, err_path = _job_logs(job.task(0))
    stderr = job.task(0).stderr() or ""
    print(
        f"a2mim launch: job {job.job_id} failed: {reason}\n"
        f"--- last {STDERR_TAIL_LINES} lines of its stderr ({err_path}) ---\n"
        f"{_tail(stderr) or '(empty)'}\n"
        f"--- full logs: {out_path} and {err_path}",
        file=sys.stderr,
        flush=True,
    )


def check_job_dir(job_dir: Path) -> None:
    """A job folder may be new, empty, or one this launcher made (it holds ``MARKER``); any
    other folder is refused: the launcher clears it, and never deletes what it did not create."""
    if job_dir.exists() and not job_dir.is_dir():
        raise LaunchError(f"--job-dir {job_dir} is a file; give a folder for the job's logs")
    if job_dir.is_dir() and any(job_dir.iterdir()) and not (job_dir / MARKER).is_file():
        raise LaunchError(
            f"--job-dir {job_dir} is not empty and was not made by `a2mim launch` (no "
            f"{MARKER} in it): it may be a run folder or your files, and the launcher "
            "clears its job folder; give a new or empty folder, e.g. "
            f"{job_dir.parent / 'jobs' / job_dir.name}"
        )


def prepare_job_dir(job_dir: Path) -> None:
    """An empty, marked job folder for this target; one left by an earlier launch is cleared
    (a result there could pass for the new job's: PITFALLS.md)."""
    check_job_dir(job_dir)
    if job_dir.is_dir() and any(job_dir.iterdir()):
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / MARKER).write_text(
        "Made by `a2mim launch`: Submitit's job folder, cleared at the next launch.\n"
    )


def preflight(argv: Sequence[str]) -> None:
    """``a2mim check <argv>`` in a child process (this waiting process never imports torch):
    a config, backend, backbone or dataset problem stops the launch before any submission."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Snakemake sets 0 for rules of 0 threads
    proc = subprocess.run(
        [sys.executable, "-m", "a2mim", "check", "--", *argv],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise LaunchError(
            f"nothing submitted: the stage's pre-flight check failed:\n{message}".replace(
                "a2mim check: error: ", ""
            )
        )


def launch(cfg: LaunchConfig, argv: Sequence[str]) -> int:
    """Check, submit ``a2mim <argv>``, wait, and return 0 on success, 1 on failure."""
    check_job_dir(cfg.job_dir)
    if "--out" in argv[:-1]:
        out = Path(argv[list(argv).index("--out") + 1]).resolve()
        job_dir = cfg.job_dir.resolve()
        if out == job_dir or job_dir in out.parents:
            raise LaunchError(
                f"--job-dir {cfg.job_dir} holds the run folder --out {out}: the launcher clears "
                "its job folder at the next launch; give the jobs their own folder"
            )
    if not (cfg.preflighted and cfg.cluster in IMMEDIATE_CLUSTERS):
        preflight(argv)
    prepare_job_dir(cfg.job_dir)
    res = cfg.resources
    for attempt in range(res.max_retries + 1):
        executor = _executor(cfg, cfg.job_dir / f"attempt{attempt}")
        try:
            job = executor.submit(StageJob(argv, res.cpus_per_task, res.signal_delay_s))
        except FailedJobError as err:  # sbatch refused it: no such partition, no SLURM, ...
            print(
                f"a2mim launch: the {cfg.cluster} executor could not submit the job:\n"
                f"{_tail(str(err), 10)}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        out_path, err_path = _job_logs(job.task(0))
        print(
            f"a2mim launch: submitted job {job.job_id} ({cfg.cluster}, {cfg.world_size} task(s)); "
            f"logs: {out_path} {err_path}",
            flush=True,
        )
        started = time.monotonic()
        try:
            job.results()  # every task (a multi-task job has one result per task)
        except FailedJobError as err:  # the stage raised: retrying would fail the same way
            _report_failure(job, str(err).strip().splitlines()[0] if str(err) else "error")
            return 1
        except UncompletedJobError as err:  # died without a result: cancelled, killed, lost
            reason = str(err).strip().splitlines()[0] if str(err) else "no result"
            if attempt < res.max_retries:
                print(
                    f"a2mim launch: job {job.job_id} ended without a result ({reason}); "
                    f"resubmitting ({attempt + 1}/{res.max_retries}), the stage resumes from its "
                    "checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            _report_failure(job, f"{reason}; gave up after {res.max_retries} resubmission(s)")
            return 1
        stdout = job.task(0).stdout() or ""
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
    """The ``a2mim launch`` options (shared with the CLI's help); defaults: ``Resources()``."""
    d = Resources()
    p.add_argument("--cluster", choices=CLUSTERS, default="local", help="executor (default local)")
    p.add_argument(
        "--job-dir",
        required=True,
        type=Path,
        help=f"this target's Submitit folder: new, empty, or made by a2mim launch ({MARKER})",
    )
    p.add_argument("--name", default="a2mim", help="job name")
    p.add_argument("--partition", default=d.partition, help="SLURM partition")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument(
        "--tasks-per-node", type=int, default=d.tasks_per_node, help="processes per node (1/GPU)"
    )
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task)
    p.add_argument("--mem-gb", type=float, default=d.mem_gb)
    p.add_argument(
        "--timeout-min", type=int, default=d.timeout_min, help="time limit of one job (minutes)"
    )
    p.add_argument(
        "--signal-delay-s",
        type=int,
        default=d.signal_delay_s,
        help="SLURM sends USR2 this long before the limit; the stage saves, the job requeues",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=d.max_retries,
        help="resubmissions after a job dies without a result (cancelled, killed, node lost)",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=d.max_requeues,
        help="SLURM: requeues at the time limit or a preemption before the job gives up",
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
        "--preflighted",
        action="store_true",
        help="the workflow's pre-flight checked this command: with a local or debug executor "
        "(the job starts at once and checks first) the launcher does not check it again",
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
    if argv[0] in ("launch", "check"):
        raise LaunchError(f"a2mim launch runs a stage, not `{argv[0]}`")
    resources = Resources(
        partition=args.partition,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        signal_delay_s=args.signal_delay_s,
        max_retries=args.max_retries,
        max_requeues=args.max_requeues,
        slurm_args=dict(args.slurm_arg),
    )
    cfg = LaunchConfig(
        job_dir=args.job_dir,
        cluster=args.cluster,
        name=args.name,
        resources=resources,
        preflighted=args.preflighted,
    )
    return cfg, argv
