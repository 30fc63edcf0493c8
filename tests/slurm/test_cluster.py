"""Real submitit jobs on the local SLURM cluster: a result, a cancellation, a requeue.

No mocks: every job goes through sbatch, slurmctld, slurmd and slurmdbd. Each wait is bounded,
so a broken cluster fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import submitit
from submitit.core.utils import UncompletedJobError

from a2mim.launch import RequeueSafe

from . import cluster as cluster_module
from .cluster import ClusterStartError, ClusterUnavailable, SlurmCluster

# Jobs unpickle this module's functions and classes; pytest imported it from tests/, which is
# not on the jobs' sys.path, so ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 120.0
REQUEUE_TIMEOUT_S = 240.0


def _sum_of_squares_in_job(n: int) -> tuple[int, str]:
    """Runs inside the job: the sum of squares 0..n-1 and the job id SLURM gave this process."""
    return sum(i * i for i in range(n)), os.environ["SLURM_JOB_ID"]


def _sleep_after_marker(marker: Path, seconds: float) -> None:
    """Runs inside the job: announces it is running, then sleeps."""
    marker.write_text(os.environ["SLURM_JOB_ID"])
    time.sleep(seconds)


class _StepCounter(RequeueSafe):
    """Counts to `total`, one step per `step_s`; every (re)start and step is appended to
    `progress`. Its state (`done_steps`) is what submitit pickles at checkpoint time. Like the
    launcher's StageJob, it requeues with a2mim.launch.RequeueSafe."""

    def __init__(self, progress: Path, total: int, step_s: float) -> None:
        self.progress = progress
        self.total = total
        self.step_s = step_s
        self.done_steps = 0

    def _append(self, line: str) -> None:
        with self.progress.open("a") as stream:
            stream.write(line + "\n")

    def __call__(self) -> int:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        self._append(f"start {self.done_steps} restart={restarts} t={time.time():.3f}")
        while self.done_steps < self.total:
            time.sleep(self.step_s)
            # Write before counting: an interruption in between repeats a step, never skips one.
            self._append(f"step {self.done_steps + 1}")
            self.done_steps += 1
        return self.done_steps


def _executor(folder: Path, cluster: SlurmCluster) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=cluster.partition, timeout_min=5, cpus_per_task=1, name="a2mim-test"
    )
    return executor


def _within(seconds: float, call: Callable[[], Any], what: str) -> Any:
    """`call()`'s value or exception, or a test failure if it has not returned after `seconds`."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # re-raised in the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.5)


def _accounted_states(cluster: SlurmCluster, job_id: str) -> list[str]:
    """Job states in the accounting database, one per run (`-D` keeps requeued runs)."""
    out = cluster.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.slurm
def test_submitit_job_returns_its_result_and_is_accounted(
    slurm_environ: SlurmCluster, tmp_path: Path
) -> None:
    print(f"cluster ready {slurm_environ.ready_after_s:.1f} s after start")
    job = _executor(tmp_path / "jobs", slurm_environ).submit(_sum_of_squares_in_job, 1000)
    value, job_id_in_job = _within(JOB_TIMEOUT_S, job.result, f"job {job.job_id}.result()")
    assert value == sum(i * i for i in range(1000)) == 332_833_500
    assert job_id_in_job == job.job_id
    _wait_until(
        lambda: _accounted_states(slurm_environ, job.job_id) == ["COMPLETED"],
        30,
        f"sacct to list job {job.job_id} COMPLETED",
    )


@pytest.mark.slurm
def test_cancelled_job_is_noticed_by_submitit(slurm_environ: SlurmCluster, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    job = _executor(tmp_path / "jobs", slurm_environ).submit(_sleep_after_marker, marker, 600)
    _wait_until(marker.exists, JOB_TIMEOUT_S, f"job {job.job_id} to start")
    slurm_environ.run(["scancel", job.job_id])
    cancelled_at = time.monotonic()
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        _within(JOB_TIMEOUT_S, job.result, f"job {job.job_id}.result() after scancel")
    print(f"submitit raised {time.monotonic() - cancelled_at:.1f} s after scancel")
    _wait_until(
        lambda: _accounted_states(slurm_environ, job.job_id) == ["CANCELLED"],
        30,
        f"sacct to list job {job.job_id} CANCELLED",
    )


def _slow_scontrol_first_on_path(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts an `scontrol` first on PATH (jobs inherit it) that, for `requeue`, lingers 2 s after
    the real one returned: what a loaded node does. SLURM signals the requeued job's processes
    meanwhile (KillWait is 5 s), so an `scontrol` that does not ignore SIGTERM dies mid-requeue."""
    real = shutil.which("scontrol")
    assert real, "scontrol is not on PATH"
    bin_dir.mkdir()
    wrapper = bin_dir / "scontrol"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'"{real}" "$@"\n'
        "status=$?\n"
        'if [ "$1" = requeue ]; then sleep 2; fi\n'
        "exit $status\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slurm
@pytest.mark.parametrize("slow_scontrol", [False, True], ids=["plain", "slow-scontrol"])
def test_preempted_checkpointable_job_resumes_from_its_progress(
    slurm_environ: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    slow_scontrol: bool,
) -> None:
    if slow_scontrol:
        _slow_scontrol_first_on_path(tmp_path / "bin", monkeypatch)
    progress = tmp_path / "progress.txt"
    total = 12
    task = _StepCounter(progress, total=total, step_s=0.5)
    job = _executor(tmp_path / "jobs", slurm_environ).submit(task)

    def lines() -> list[str]:
        return progress.read_text().splitlines() if progress.exists() else []

    _wait_until(lambda: "step 3" in lines(), JOB_TIMEOUT_S, f"job {job.job_id} to count to 3")
    interrupted_at = time.time()
    job._interrupt()  # what SLURM preemption does: SIGTERM, then submitit's USR2
    assert _within(REQUEUE_TIMEOUT_S, job.result, f"requeued job {job.job_id}") == total

    log = lines()
    starts = [line.split() for line in log if line.startswith("start ")]
    assert [(s[1], s[2]) for s in starts[:1]] == [("0", "restart=0")]
    assert len(starts) == 2, log
    resumed_from = int(starts[1][1])
    assert starts[1][2] == "restart=1"
    restart_index = log.index(" ".join(starts[1]))
    steps_before = [int(line.split()[1]) for line in log[:restart_index] if line.startswith("step")]
    steps_after = [int(line.split()[1]) for line in log[restart_index:] if line.startswith("step")]
    # Resumed where it stopped (one step repeated at most), not from zero.
    assert resumed_from >= 3
    assert resumed_from in (steps_before[-1], steps_before[-1] - 1)
    assert steps_before == list(range(1, steps_before[-1] + 1))
    assert steps_after == list(range(resumed_from + 1, total + 1))
    restarted_at = float(starts[1][3].removeprefix("t="))
    print(f"requeued job restarted {restarted_at - interrupted_at:.1f} s after the interrupt")
    _wait_until(
        lambda: _accounted_states(slurm_environ, job.job_id) == ["REQUEUED", "COMPLETED"],
        30,
        f"sacct to list job {job.job_id} REQUEUED then COMPLETED",
    )


def test_missing_binaries_make_the_cluster_unavailable_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client commands live in bin/ (daemons in sbin/ are still found by their usual place).
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    workdir = tmp_path / "cluster"
    expected = r"missing binaries .*sbatch.*slurm-client.*bash \.ci/install_slurm\.sh"
    with pytest.raises(ClusterUnavailable, match=expected):
        SlurmCluster(workdir).start()
    assert not workdir.exists()


@pytest.mark.slurm
def test_daemon_dying_at_startup_fails_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reasons = cluster_module.missing_requirements()
    if reasons:
        pytest.skip("; ".join(reasons))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # Every daemon is handed a port that another process already listens on.
        monkeypatch.setattr(cluster_module, "free_port", lambda: taken)
        cluster = SlurmCluster(tmp_path / "cluster")
        with pytest.raises(ClusterStartError) as failure:
            cluster.start()
    message = str(failure.value)
    assert "slurmdbd" in message and "exited" in message
    assert "Address already in use" in message  # from the tail of slurmdbd's log
    assert not cluster_module._processes_with_env("SLURM_CONF", str(cluster.conf_path))
