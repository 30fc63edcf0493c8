"""Run the distinct paper jobs as the workflow does (``python -m a2mim.cli <stage> ...``), each a
subprocess with one torch thread, two at a time, each downstream job after the job it inits from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from paper_jobs import REPO, Job


@dataclass
class JobResult:
    job: Job
    returncode: int | None  # None: not run (its init job failed)
    wall_s: float
    log: Path
    reason: str = ""
    cpu_s: float = 0.0  # user + system CPU of the job's process (what it costs without contention)

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]


def run_jobs(jobs: list[Job], log_dir: Path, lanes: int = 2) -> dict[str, JobResult]:
    """Run ``jobs`` (DAG order) on ``lanes`` parallel subprocesses; results by job key."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    done: dict[str, threading.Event] = {j.key: threading.Event() for j in jobs}
    results: dict[str, JobResult] = {}

    def run_one(job: Job) -> None:
        log = log_dir / f"{job.stage}__{job.name}.log"
        try:
            if job.init is not None:
                init_key = f"{job.init[0]}/{job.init[1]}"
                done[init_key].wait()
                if results[init_key].returncode != 0:
                    results[job.key] = JobResult(job, None, 0.0, log, f"init job {init_key} failed")
                    return
            start = time.perf_counter()
            with log.open("w") as fh:
                fh.write("$ python -m a2mim.cli " + " ".join(job.argv) + "\n")
                fh.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "a2mim.cli", *job.argv],
                    cwd=REPO,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
                _, status, usage = os.wait4(proc.pid, 0)  # the exit status and this child's CPU
                proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            cpu = usage.ru_utime + usage.ru_stime
            results[job.key] = JobResult(job, proc.returncode, wall, log, cpu_s=cpu)
            # The resume state (optimizer moments: ~1.3 GB for a ViT-B job) is not read by any
            # check or downstream job; without this the run folders take ~22 GB, with it ~6 GB.
            (job.out / "checkpoint.pt").unlink(missing_ok=True)
        finally:
            done[job.key].set()

    # A lane takes the next job in `longest_chain_first` order (inits always before the jobs that
    # start from them, so a waiting job never holds a lane its own init needs).
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for future in [pool.submit(run_one, job) for job in longest_chain_first(jobs)]:
            future.result()
    return results


# Rough relative cost of one capped job per stage (CPU time measured on this test's caps).
STAGE_COST = {"pretrain": 1.0, "finetune": 1.0, "linprobe": 1.0, "segment": 2.0, "detect": 4.0}


def longest_chain_first(jobs: list[Job]) -> list[Job]:
    """A topological order that starts the job heading the costliest chain first (detection
    waits for its init, so its init should not wait behind cheap jobs)."""
    children: dict[str, list[Job]] = {j.key: [] for j in jobs}
    for job in jobs:
        if job.init is not None:
            children[f"{job.init[0]}/{job.init[1]}"].append(job)

    def chain(job: Job) -> float:
        return STAGE_COST[job.stage] + max((chain(c) for c in children[job.key]), default=0.0)

    placed: set[str] = set()
    order: list[Job] = []
    while len(order) < len(jobs):
        ready = [
            j
            for j in jobs
            if j.key not in placed and (j.init is None or f"{j.init[0]}/{j.init[1]}" in placed)
        ]
        best = max(ready, key=chain)  # max keeps the first (DAG order) among equals
        order.append(best)
        placed.add(best.key)
    return order
