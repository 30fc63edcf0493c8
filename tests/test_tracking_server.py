"""MLflow through a tracking server (`mlflow server`, backend store bound to 127.0.0.1), as on a
cluster: a stage launched as a job logs over HTTP; SIGTERM to the job marks its run KILLED; the
relaunched job continues the same MLflow run to FINISHED; `a2mim tables` reads from the server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from a2mim import tracking
from a2mim.data.fashion_mnist import prepare_fashion_mnist
from tests.slurm.cluster import free_port

MLFLOW = Path(sys.executable).parent / "mlflow"
A2MIM = [sys.executable, "-m", "a2mim"]


@pytest.fixture
def server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a sqlite backend store and proxied artifacts."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _runs(url: str) -> list[dict]:
    return tracking.query_runs(url, "a2mim", "tags.stage = 'pretrain'")


def test_stage_logs_to_a_server_is_killed_by_sigterm_and_resumes_the_same_run(
    server, tmp_path, monkeypatch
):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_MLFLOW_URI, raising=False)
    root = tmp_path / "fm"
    prepare_fashion_mnist(root, train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    argv = [
        "--", "pretrain", "--config", "tiny", "--out", str(out),
        "--set", f"data.root={root}", "--set", "epochs=4", "--set", "batch_size=16",
        "--set", "ckpt_every_steps=2", "--set", "progress=false",
        "--set", f"tracking_uri={server}", "--tag", "experiment=served",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [*A2MIM, "launch", "--job-dir", str(tmp_path / "jobs"), "--max-retries", "0"]
    proc = subprocess.Popen(
        [*launch, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    job_id = int(re.search(r"submitted job (\d+)", proc.stdout.readline()).group(1))
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    task = int(Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()[0])
    os.kill(task, signal.SIGTERM)  # what `scancel` and a node shutdown send
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr  # no result: max_retries 0, so the launcher gives up
    (run,) = _runs(server)
    assert run["status"] == "KILLED", run["status"]
    assert run["artifact_uri"].startswith("mlflow-artifacts:")  # artifacts go through the server

    done = subprocess.run([*launch, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    (resumed,) = _runs(server)  # the same MLflow run, continued
    assert resumed["run_id"] == run["run_id"] and resumed["status"] == "FINISHED"
    assert "loss" in resumed["metrics"]  # the stage's metrics went over HTTP
    assert "final_loss" in (out / "metrics.json").read_text()
    assert (out / "mlflow_run_id").read_text().strip() == run["run_id"]

    # The tables read the server (the run fills no paper cell: the table is written, empty).
    tables = tmp_path / "tables"
    result = subprocess.run(
        [*A2MIM, "tables", "--experiment", "served", "--tracking-uri", server,
         "--out", str(tables), "--table", "table1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tables / "table1.md").is_file()
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["tracking_uri"] == server
