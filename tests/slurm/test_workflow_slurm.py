"""The workflow through profiles/slurm on a real single-node SLURM cluster.

A tiny DAG (prepare -> pretrain -> fine-tune -> table1 + audit) runs with every stage submitted by
`a2mim launch --cluster slurm`. Mid-way through pre-training the test sends the job SLURM's
time-limit signal (USR2, what `scancel --signal` and a real time limit deliver): Submitit calls the
stage job's checkpoint(), the job requeues itself, and the restarted job resumes from the run
folder's checkpoint. The DAG must then finish, with the requeue in SLURM's accounting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .cluster import SlurmCluster

DAG_TIMEOUT_S = 900.0
ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def _config(tmp_path: Path, partition: str) -> Path:
    cfg = {
        "experiment": "ci-slurm",
        "scale": "tiny",
        "results": str(tmp_path / "results" / "ci-slurm"),
        "datasets": {
            "fmnist": {
                "prepare": {"dataset": "fashion-mnist", "train_per_class": 40, "val_per_class": 10}
            }
        },
        "pretrain": {
            "a2mim_r18": {
                "recipe": "tiny",
                "data": "fmnist",
                "set": {"epochs": 8, "batch_size": 32, "ckpt_every_steps": 4, "log_every_steps": 1},
            }
        },
        "finetune": {
            "a2mim_r18": {
                "recipe": "tiny",
                "data": "fmnist",
                "init": "a2mim_r18",
                "set": {"epochs": 1, "batch_size": 32},
                "cells": ["table1_resnet50_in1k/A2MIM/fast_ft_a3"],
            }
        },
        "resources": {
            "default": {
                "partition": partition,
                "cpus_per_task": 1,
                "timeout_min": 15,
                "max_retries": 1,
            }
        },
    }
    path = tmp_path / "ci-slurm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _job_id(cluster: SlurmCluster, name: str) -> str | None:
    out = cluster.run(["squeue", "-h", "-o", "%i %T", "-n", name], check=False).stdout.split()
    return out[0] if len(out) == 2 and out[1] == "RUNNING" else None


@pytest.mark.slurm
@pytest.mark.slow
def test_dag_through_slurm_profile_survives_a_requeue(slurm_environ: SlurmCluster, tmp_path):
    cfg = _config(tmp_path, slurm_environ.partition)
    results = tmp_path / "results" / "ci-slurm"
    run = results / "runs" / "pretrain" / "a2mim_r18"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(SNAKEMAKE), "--profile", "profiles/slurm", f"--configfile={cfg}", "all_tables"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + DAG_TIMEOUT_S
        job = None
        while job is None:  # wait for the pretrain job's first checkpoint
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "pretrain never checkpointed"
            if (run / "checkpoint.pt").exists():
                job = _job_id(slurm_environ, "a2mim-ci-slurm-pretrain-a2mim_r18")
            time.sleep(0.3)
        slurm_environ.run(["scancel", "--signal", "USR2", job])  # the time-limit signal
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]

    # SLURM requeued the job once, and the second run resumed from a checkpoint (not step 0).
    states = slurm_environ.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job]).stdout
    assert [s.split()[0] for s in states.split()] == ["REQUEUED", "COMPLETED"], states
    job_logs = "".join(p.read_text() for p in (results / "jobs" / "pretrain").rglob("*_log.out"))
    assert "requeueing" in job_logs
    resumed = re.search(r"pretrain: resuming from \S+ at step (\d+)", job_logs)
    assert resumed and int(resumed.group(1)) > 0, job_logs[-3000:]
    steps = [yaml.safe_load(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one record per step: no gap, no repeat

    # The rest of the DAG ran on SLURM and the tables came out of MLflow.
    ft_logs = "".join(p.read_text() for p in (results / "jobs" / "finetune").rglob("*_log.out"))
    assert "a2mim job" in ft_logs
    table1 = (results / "tables" / "table1.md").read_text()
    assert "ci-slurm" in table1 and "tiny" in table1
    assert (results / "tables" / "audit.md").is_file()
