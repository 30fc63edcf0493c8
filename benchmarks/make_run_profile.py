"""Where does the wall time of ``make run`` go? Reads a finished run's logs; runs nothing.

From the Snakemake log (``make run > LOG 2>&1``) it takes each job's start and finish, and from
the results folder each stage job's Submitit files: when the launcher submitted it
(``*_submitted.pkl``), when the job process started (its ``Starting with JobEnvironment`` line),
when the stage had opened its run (``resolved_config.yaml``) and when the job completed (its
``Job completed`` line). It prints:

* the wall time, the summed job time and how busy the two lanes were (seconds with 0/1/2 jobs);
* job time per rule;
* per stage job, the time outside the stage: launcher start-up before the submission
  (Snakemake start -> submitted), the job's own start-up (submitted -> run folder opened) and
  the tail after the job completed (completed -> Snakemake finish), with their sums.

    python benchmarks/make_run_profile.py /tmp/baseline_run.log results/tiny
"""

from __future__ import annotations

import argparse
import collections
import re
from datetime import datetime
from pathlib import Path

_STAMP = re.compile(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]")
_SUBMITIT = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\) - (Starting with|Job completed)")


def snakemake_jobs(log: Path) -> list[dict]:
    """Jobs of a Snakemake log: rule, start, end, and the stage job's ``--job-dir``."""
    jobs: dict[int, dict] = {}
    now, current = None, None
    for line in log.read_text().splitlines():
        if m := _STAMP.match(line):
            now = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"(?:local)?rule (\w+):", line):
            current = {"rule": m.group(1), "start": now, "job_dir": None}
        elif (m := re.match(r"\s+jobid: (\d+)", line)) and current is not None:
            jobs[int(m.group(1))] = current
        elif (m := re.search(r"--job-dir (\S+)", line)) and current is not None:
            current["job_dir"] = m.group(1)
        elif (m := re.match(r"Finished jobid: (\d+)", line)) and int(m.group(1)) in jobs:
            jobs[int(m.group(1))]["end"] = now
    return [job for job in jobs.values() if "end" in job]


def stage_times(results: Path, job_dir: str) -> dict[str, datetime] | None:
    """Submission, process start, run folder opened, completion of a stage job's last attempt."""
    folder = results.parent.parent / job_dir if not Path(job_dir).is_absolute() else Path(job_dir)
    attempts = sorted(folder.glob("attempt*"))
    if not attempts:
        return None
    last = attempts[-1]
    submitted = next(last.glob("*_submitted.pkl"), None)
    out = next(last.glob("*_log.out"), None)
    if submitted is None or out is None:
        return None
    times = {"submitted": datetime.fromtimestamp(submitted.stat().st_mtime)}
    for m in _SUBMITIT.finditer(out.read_text()):
        key = "started" if m.group(2) == "Starting with" else "completed"
        times[key] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    run = results / "runs" / "/".join(Path(job_dir).parts[-2:]) / "resolved_config.yaml"
    if run.exists():
        times["opened"] = datetime.fromtimestamp(run.stat().st_mtime)
    return times if "completed" in times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the Snakemake output of make run")
    parser.add_argument("results", type=Path, help="the results folder, e.g. results/tiny")
    args = parser.parse_args()
    jobs = snakemake_jobs(args.log)
    t0, t1 = min(j["start"] for j in jobs), max(j["end"] for j in jobs)
    wall = (t1 - t0).total_seconds()
    busy = sum((j["end"] - j["start"]).total_seconds() for j in jobs)
    lanes = collections.Counter()
    for second in range(int(t0.timestamp()), int(t1.timestamp())):
        running = sum(j["start"].timestamp() <= second < j["end"].timestamp() for j in jobs)
        lanes[min(running, 3)] += 1
    print(
        f"{len(jobs)} jobs, wall {wall:.0f} s, job time {busy:.0f} s, lanes busy "
        f"{busy / (2 * wall):.0%}; seconds with n jobs running: {dict(sorted(lanes.items()))}"
    )
    per_rule = collections.defaultdict(float)
    for job in jobs:
        per_rule[job["rule"]] += (job["end"] - job["start"]).total_seconds()
    print(
        "job time per rule:",
        ", ".join(f"{k} {v:.0f} s" for k, v in sorted(per_rule.items(), key=lambda kv: -kv[1])),
    )
    sums = collections.Counter()
    print(f"{'stage job':34s} {'launch':>7s} {'startup':>8s} {'stage':>7s} {'tail':>6s}  (s)")
    for job in sorted(jobs, key=lambda j: j["start"]):
        times = stage_times(args.results, job["job_dir"]) if job["job_dir"] else None
        if times is None or "opened" not in times:
            continue
        launch = (times["submitted"] - job["start"]).total_seconds()
        startup = (times["opened"] - times["submitted"]).total_seconds()
        stage = (times["completed"] - times["opened"]).total_seconds()
        tail = (job["end"] - times["completed"]).total_seconds()
        name = "/".join(Path(job["job_dir"]).parts[-2:])
        print(f"{name:34s} {launch:7.1f} {startup:8.1f} {stage:7.1f} {tail:6.1f}")
        sums.update({"launch": launch, "startup": startup, "stage": stage, "tail": tail, "n": 1})
    if sums["n"]:
        outside = sums["launch"] + sums["tail"]
        print(
            f"sums over {sums['n']} stage jobs: launch {sums['launch']:.0f} s, startup "
            f"{sums['startup']:.0f} s, stage {sums['stage']:.0f} s, tail {sums['tail']:.0f} s; "
            f"outside the job process {outside:.0f} s = {outside / (2 * wall):.1%} of the "
            "two lanes"
        )


if __name__ == "__main__":
    main()
