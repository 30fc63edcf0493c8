"""`a2mim launch`: a stage as a real Submitit job (local executor), its failures, and the
resubmission of a job that dies without a result (SIGKILL), which resumes from the checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from a2mim.data.fashion_mnist import prepare_fashion_mnist

A2MIM = [sys.executable, "-m", "a2mim"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist") / "fm"
    prepare_fashion_mnist(root, train_per_class=8, val_per_class=2)
    return root


def _config(tmp_path: Path, root: Path, **top) -> Path:
    cfg = {
        "scale": "tiny",
        "model": {"preset": "a2mim_resnet18"},
        "data": {"root": str(root)},
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "epochs": 2,
        "batch_size": 16,
        "ckpt_every_steps": 1,
        "log_every_steps": 1,
        "figure_every_epochs": 100,
        "progress": False,
        "track": False,
    }
    cfg.update(top)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*A2MIM, "launch", *args], capture_output=True, text=True, timeout=300, env=env, **kw
    )


def test_stage_runs_as_a_local_job_in_a_cleared_folder(fmnist, tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / ".a2mim-launch").write_text("")  # a job folder of an earlier launch: cleared
    (jobs / "stale_result.pkl").write_text("left by an earlier run")
    cfg = _config(tmp_path, fmnist, epochs=1)
    out = tmp_path / "run"
    result = _launch(
        "--job-dir", str(jobs), "--", "pretrain", "--config", str(cfg), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert not (jobs / "stale_result.pkl").exists()
    assert (out / "encoder.pt").is_file()
    assert re.search(r"submitted job \d+ \(local, 1 task\(s\)\)", result.stdout)
    assert "final_loss" in result.stdout  # the job's stdout reaches the launcher's (rule log)


def test_config_error_exits_2_before_anything_is_submitted(fmnist, tmp_path):
    cfg = _config(tmp_path, fmnist, epoch=1)  # typo of epochs
    jobs = tmp_path / "jobs"
    result = _launch(
        "--job-dir", str(jobs), "--", "pretrain", "--config", str(cfg), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2
    assert "unknown key(s) ['epoch']" in result.stderr and "did you mean 'epochs'" in result.stderr
    assert not jobs.exists()


def test_preflighted_local_job_checks_itself_and_slurm_is_always_checked_first(
    fmnist, tmp_path, monkeypatch
):
    # the workflow's rules pass --preflighted: a local job starts at once and its stage checks
    # the command first, so the error still names the key, with exit 1 and no run folder
    cfg = _config(tmp_path, fmnist, epoch=1)  # typo of epochs
    out = tmp_path / "o"
    result = _launch(
        "--preflighted", "--job-dir", str(tmp_path / "jobs"), "--",
        "pretrain", "--config", str(cfg), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "submitted job" in result.stdout and "did you mean 'epochs'" in result.stderr
    assert not out.exists()

    # in process: which executors skip the launcher's own check when the workflow checked
    from a2mim import launch

    class Submitted(Exception):
        pass

    checked: list[str] = []

    def check(argv):
        checked.append(argv[0])
        raise launch.LaunchError("checked")

    def prepare(job_dir):
        raise Submitted

    monkeypatch.setattr(launch, "preflight", check)
    monkeypatch.setattr(launch, "prepare_job_dir", prepare)
    argv = ["pretrain", "--config", str(cfg), "--out", str(out)]
    for cluster, preflighted, outcome in [
        ("slurm", True, launch.LaunchError),  # queued for hours: the launcher checks first
        ("slurm", False, launch.LaunchError),
        ("local", False, launch.LaunchError),  # `a2mim launch` by hand: checked first
        ("local", True, Submitted),
        ("debug", True, Submitted),
    ]:
        job = launch.LaunchConfig(tmp_path / "j", cluster=cluster, preflighted=preflighted)
        with pytest.raises(outcome):
            launch.launch(job, argv)
    assert checked == ["pretrain"] * 3


def test_job_process_ends_without_teardown_only_after_its_result(tmp_path):
    # the exit a finished job registers: no result file -> the normal exit (its error code)
    from a2mim.launch import _exit_after_result

    assert _exit_after_result(tmp_path / "missing_result.pkl") is None
    script = (
        "import atexit, sys, logging; from pathlib import Path; import torch\n"
        "from a2mim.launch import _exit_after_result\n"
        "logging.basicConfig(stream=sys.stdout); logging.getLogger().warning('log line')\n"
        "result = Path(sys.argv[1]); result.write_text('x') if sys.argv[2] == 'ok' else None\n"
        "atexit.register(_exit_after_result, result)\n"
        "sys.stdout.write('unflushed'); sys.exit(int(sys.argv[3]))\n"
    )
    for written, code, expected in [("ok", 0, 0), ("ok", 3, 0), ("missing", 3, 3)]:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"r{code}{written}"), written, str(code)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == expected, proc.stderr
        assert "log line" in proc.stdout and "unflushed" in proc.stdout  # nothing lost


def test_crashing_job_exits_1_with_its_stderr_tail_and_log_paths(tmp_path):
    empty = tmp_path / "no-images"  # the layout passes the pre-flight; the job finds no image
    for split in ("train", "val"):
        (empty / split / "c0").mkdir(parents=True)
    cfg = _config(tmp_path, empty)
    out = tmp_path / "run"
    result = _launch(
        "--job-dir", str(tmp_path / "jobs"), "--max-retries", "2", "--",
        "pretrain", "--config", str(cfg), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr
    assert "failed" in err and "no-images" in err  # the cause, from the job's stderr
    assert re.search(r"full logs: \S+_log\.out and \S+_log\.err", err)
    assert err.count("submitted job") == 0 and result.stdout.count("submitted job") == 1  # no retry
    assert not (out / "encoder.pt").exists()


def test_job_killed_without_result_is_resubmitted_and_resumes(fmnist, tmp_path):
    cfg = _config(tmp_path, fmnist, epochs=3)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*A2MIM, "launch", "--job-dir", str(tmp_path / "jobs"), "--max-retries", "1", "--",
         "pretrain", "--config", str(cfg), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    first_line = proc.stdout.readline()
    job_id = int(re.search(r"submitted job (\d+)", first_line).group(1))
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    # A local job id is the pid of Submitit's controller; the stage runs in its child (the task),
    # which is what an OOM kill or a crash takes down.
    children = Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"job {job_id} ended without a result" in stderr
    assert "resubmitting (1/1)" in stderr
    assert re.search(r"pretrain: resuming from \S+checkpoint\.pt at step [1-9]", stdout)
    steps = [
        yaml.safe_load(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert (
        steps == sorted(set(steps)) and steps[-1] == steps[0] + len(steps) - 1
    )  # no gap, no repeat
    assert (out / "encoder.pt").is_file()


def test_a_run_folder_has_one_live_writer(tmp_path):
    from a2mim.train.rundir import RunInUseError, lock_run

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from a2mim.train.rundir import lock_run; "
         f"lock_run(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"another live process \(pid {holder.pid}\)"):
            lock_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run(tmp_path)  # released by the kernel when the holder died (SIGKILL)


def test_requeue_command_outlives_the_sigterm_slurm_sends_the_requeued_job(tmp_path):
    # Submitit runs `scontrol requeue` right after StageJob.checkpoint; SLURM then SIGTERMs the
    # job's processes. A child started after checkpoint() must survive that SIGTERM (the race is
    # reproduced on a real cluster in tests/slurm/test_cluster.py, slow-scontrol).
    script = (
        "import signal, subprocess, sys, time\n"
        "from a2mim.launch import StageJob\n"
        "StageJob(['pretrain']).checkpoint()\n"
        "child = subprocess.Popen(['sleep', '30'])\n"
        "time.sleep(0.2)\n"
        "child.send_signal(signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "alive = child.poll() is None\n"
        "child.kill()\n"
        "print('alive' if alive else f'died {child.wait()}')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split()[-1] == "alive", out.stdout + out.stderr
