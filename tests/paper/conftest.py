"""Session fixtures of the paper-geometry test: the generated datasets and the paper jobs' runs.

The data are written once per session; all distinct paper jobs run once (two at a time, one
torch thread each) the first time a test asks for them, and their wall times are printed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from paper_data import make_ade20k, make_coco, make_imagenet
from paper_jobs import Job, distinct_jobs, paper_matrix
from paper_runner import JobResult, run_jobs

from a2mim.workflow import Matrix

# paper.yaml dataset -> generated folder (IN-100 is an ImageFolder like IN-1K).
DATASET_FOLDERS = {
    "in1k": "imagenet",
    "in100": "imagenet",
    "coco": "coco",
    "ade20k": "ADEChallengeData2016",
}
DETECTRON2 = importlib.util.find_spec("detectron2") is not None


@dataclass
class PaperRuns:
    matrix: Matrix
    jobs: list[Job]
    results: dict[str, JobResult]
    wall_s: float
    backend_switched: list[str]  # detect jobs run with backend torchvision (no detectron2)

    def job(self, key: str) -> Job:
        return next(job for job in self.jobs if job.key == key)


def collection_jobs() -> list[Job]:
    """The distinct jobs, for parametrizing (placeholder roots: nothing is read)."""
    roots = {name: Path("/nonexistent") / f for name, f in DATASET_FOLDERS.items()}
    return distinct_jobs(paper_matrix(Path("/nonexistent/results"), roots))


@pytest.fixture(scope="session")
def paper_data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("paper_data")
    folders = {
        "imagenet": make_imagenet(base / "imagenet"),
        "coco": make_coco(base / "coco"),
        "ADEChallengeData2016": make_ade20k(base / "ADEChallengeData2016"),
    }
    return {name: folders[f] for name, f in DATASET_FOLDERS.items()}


@pytest.fixture(scope="session")
def paper_runs(paper_data, tmp_path_factory, request) -> PaperRuns:
    results_dir = tmp_path_factory.mktemp("paper_results")
    matrix = paper_matrix(results_dir, paper_data)
    jobs = _selected(distinct_jobs(matrix), request.session.items)
    switched = []
    for job in jobs:
        if job.stage == "detect" and not DETECTRON2 and _recipe_backend(job) == "detectron2":
            job.caps["backend"] = "torchvision"
            switched.append(job.key)
    start = time.perf_counter()
    results = run_jobs(jobs, results_dir / "logs", lanes=2)
    wall = time.perf_counter() - start
    _report(jobs, results, wall, switched)
    summary = {k: [r.returncode, round(r.wall_s, 1), round(r.cpu_s, 1)] for k, r in results.items()}
    (results_dir / "timings.json").write_text(json.dumps({"wall_s": wall, "jobs": summary}))
    return PaperRuns(matrix, jobs, results, wall, switched)


def _selected(jobs: list[Job], items) -> list[Job]:
    """The jobs the selected tests ask for (``-k``), with the jobs they init from."""
    by_key = {job.key: job for job in jobs}
    wanted = {  # this folder's tests only: other modules have `key` parameters of their own
        item.callspec.params["key"]
        for item in items
        if Path(str(item.path)).parent == Path(__file__).parent
        and hasattr(item, "callspec")
        and item.callspec.params.get("key") in by_key
    }
    todo = list(wanted)
    while todo:
        job = by_key[todo.pop()]
        if job.init is not None and f"{job.init[0]}/{job.init[1]}" not in wanted:
            wanted.add(f"{job.init[0]}/{job.init[1]}")
            todo.append(f"{job.init[0]}/{job.init[1]}")
    return [job for job in jobs if job.key in wanted]


def _recipe_backend(job: Job) -> str:
    from a2mim import recipes
    from a2mim.config import load_yaml

    return load_yaml(recipes.resolve(job.stage, job.argv[job.argv.index("--config") + 1])).get(
        "backend", "auto"
    )


SUMMARY: list[str] = []  # printed after the test session (pytest_terminal_summary)


def _report(jobs, results, wall, switched) -> None:
    cpu = sum(r.cpu_s for r in results.values())
    SUMMARY.append(
        f"{len(jobs)} distinct jobs, {wall:.0f} s wall on 2 lanes, {cpu:.0f} s CPU in all "
        "(wall / CPU per job):"
    )
    for job in jobs:
        r = results[job.key]
        state = "ok" if r.returncode == 0 else (r.reason or f"exit {r.returncode}")
        also = f" (= {', '.join(job.same_as)})" if job.same_as else ""
        SUMMARY.append(f"  {r.wall_s:6.1f} / {r.cpu_s:6.1f} s  {job.key:34s} {state}{also}")
    if switched:
        SUMMARY.append(f"detectron2 not importable: backend torchvision for {', '.join(switched)}")


def pytest_terminal_summary(terminalreporter) -> None:
    if SUMMARY:
        terminalreporter.write_sep("-", "paper-geometry jobs")
        for line in SUMMARY:
            terminalreporter.write_line(line)
