"""Every distinct job of ``workflow/config/paper.yaml`` takes real steps at paper geometry.

Each job (recipe x preset x init kind, chained through ``--init`` as the DAG chains them) runs as
the workflow's rule runs it (``python -m a2mim.cli <stage>`` with `Matrix.stage_args`) on
format-faithful data (`paper_data`), with only the test's caps (`paper_jobs.CAPS`) added. The
tests check that it stepped and evaluated, that its ``resolved_config.yaml`` and MLflow params
are the paper job's config but for the caps, and that every paper run's config at the paper's
resources gives the paper's values (`paper_values.yaml`): global batch, scaled lr, schedule,
warm-up, image sizes, crop scale, model.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PaperRuns, collection_jobs
from paper_jobs import PAPER_CONFIG, Job

from a2mim.config import to_dict
from a2mim.workflow import STAGES, Matrix

pytestmark = pytest.mark.paper_geometry

KEYS = [job.key for job in collection_jobs()]
PAPER_VALUES = yaml.safe_load((Path(__file__).parent / "paper_values.yaml").read_text())
# What each stage writes last, and the metric its evaluation reports.
OUTPUT = {"pretrain": "encoder.pt", "finetune": "model.pt", "linprobe": "metrics.json",
          "detect": "model.pt", "segment": "metrics.json"}  # fmt: skip
EVAL_METRIC = {"finetune": "top1", "linprobe": "top1", "detect": "ap_box", "segment": "miou"}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _stage_module(stage: str):
    import importlib

    return importlib.import_module(f"a2mim.stages.{stage}")


def paper_config(stage: str, argv: list[str]):
    """The validated config of ``a2mim <stage> <argv>`` as the CLI builds it (nothing run)."""
    from a2mim import command

    args = command.parse([stage, *argv])
    return _stage_module(stage).load_config(command.config_data(stage, args), where=args.config)


def _view(stage: str, cfg) -> dict[str, Any]:
    """Flat dotted view of a config; pretrain adds its preset's MIMConfig under ``mim.``."""
    data = to_dict(cfg)
    if stage == "pretrain":
        data["mim"] = to_dict(cfg.mim_config())
    return _flat(data)


def _result(runs: PaperRuns, job: Job):
    result = runs.results[job.key]
    command = "python -m a2mim.cli " + shlex.join(job.argv)
    if result.returncode is None:
        pytest.fail(f"{job.key} did not run: {result.reason}\n$ {command}")
    if result.returncode != 0:
        pytest.fail(
            f"{job.key} exited {result.returncode} after {result.wall_s:.0f} s\n$ {command}\n"
            f"--- log tail ---\n{result.tail()}"
        )
    return result


@pytest.mark.parametrize("key", KEYS)
def test_paper_job_takes_steps(paper_runs: PaperRuns, key: str):
    """The job exits 0 after 1-3 finite optimizer steps, evaluates and writes its outputs."""
    job = paper_runs.job(key)
    _result(paper_runs, job)
    out = job.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "step" in r]
    assert train, f"{out}/metrics.jsonl has no training row: {rows}"
    assert 1 <= max(r["step"] for r in train) <= 3, train
    assert all(math.isfinite(r["loss"]) for r in train), train
    assert (out / OUTPUT[job.stage]).is_file(), sorted(p.name for p in out.iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    if job.stage in EVAL_METRIC:
        value = metrics.get(EVAL_METRIC[job.stage])
        assert value is not None and math.isfinite(value), metrics
    if job.init is not None:  # chained as the DAG chains it: the init run's weights were loaded
        derived = yaml.safe_load((out / "resolved_config.yaml").read_text())["derived"]
        init_path = job.paper_argv[job.paper_argv.index("--init") + 1]
        assert Path(init_path).is_file()
        init = derived.get("init") or {}
        assert init.get("path") == init_path, f"{job.key}: derived.init {init} is not {init_path}"


@pytest.mark.parametrize("key", KEYS)
def test_paper_job_runs_paper_config(paper_runs: PaperRuns, key: str):
    """``resolved_config.yaml`` (and the MLflow params) of the stepped run are the paper job's
    config key by key, except the test's caps; its lr is the scaling rule at its global batch."""
    job = paper_runs.job(key)
    _result(paper_runs, job)
    resolved = yaml.safe_load((job.out / "resolved_config.yaml").read_text())
    assert resolved.pop("stage") == job.stage
    derived = resolved.pop("derived")
    ran = _flat(resolved)
    paper = _flat(to_dict(paper_config(job.stage, job.paper_argv[1:])))
    for key, value in job.caps.items():
        assert ran.get(key) == value, f"{job.key}: cap {key}={value!r} not applied ({ran.get(key)})"
    differ = sorted(
        k for k in set(ran) | set(paper) if k not in job.caps and ran.get(k) != paper.get(k)
    )
    assert not differ, f"{job.key}: the run differs from the paper job in " + ", ".join(
        f"{k}: ran {ran.get(k)!r}, paper {paper.get(k)!r}" for k in differ
    )
    optim = resolved.get("optim") or resolved.get("solver")
    expected_lr = optim["base_lr"] * derived["global_batch"] / optim["lr_batch_divisor"]
    assert derived["lr"] == pytest.approx(expected_lr, rel=1e-9), (derived, optim)
    params = _mlflow_params(job)
    from a2mim.tracking import flatten_params

    logged = {
        k: v for k, v in resolved.items() if k not in ("tags", "progress", "track", "tracking_uri")
    }
    want = flatten_params(logged)
    mismatch = {k: (v, params.get(k)) for k, v in want.items() if params.get(k) != v}
    assert not mismatch, f"{job.key}: MLflow params differ from resolved_config.yaml: {mismatch}"
    assert float(params["derived.lr"]) == pytest.approx(derived["lr"], rel=1e-6)
    assert int(params["derived.global_batch"]) == derived["global_batch"]


def _mlflow_params(job: Job) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    uri = job.paper_argv[job.paper_argv.index("--set") + 1 :]
    uri = next(a.split("=", 1)[1] for a in uri if a.startswith("tracking_uri="))
    run_id = (job.out / "mlflow_run_id").read_text().strip()
    return MlflowClient(tracking_uri=json.loads(uri)).get_run(run_id).data.params


# ------------------------------------------------------------------- paper values (no run)


def _paper_runs() -> list[tuple[str, str]]:
    matrix = _placeholder_matrix()
    return [(stage, name) for stage in STAGES for name in matrix.runs(stage)]


def _placeholder_matrix() -> Matrix:
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    config["results"] = "/nonexistent/results"
    return Matrix(config)


def _values_key(stage: str, cfg, spec: dict) -> str:
    """``pretrain/<recipe>/<preset>`` when the recipe has values of its own (the IN-100 ablation
    recipes at 192 px), else ``pretrain/<preset>``; ``<stage>/<recipe>`` downstream."""
    if stage != "pretrain":
        return f"{stage}/{spec['recipe']}"
    own = f"pretrain/{spec['recipe']}/{cfg.model.preset}"
    return own if own in PAPER_VALUES else f"pretrain/{cfg.model.preset}"


@pytest.mark.parametrize("stage,name", _paper_runs(), ids=[f"{s}/{n}" for s, n in _paper_runs()])
def test_paper_run_holds_paper_values(stage: str, name: str):
    """The run's config as paper.yaml builds it, at paper.yaml's resources, gives the paper's
    global batch, scaled lr and settings; a step schedule's milestones lie inside the run."""
    matrix = _placeholder_matrix()
    spec = matrix.runs(stage)[name]
    argv = shlex.split(matrix.stage_args(stage, name))
    cfg = paper_config(stage, argv)
    key = _values_key(stage, cfg, spec)
    assert key in PAPER_VALUES, (
        f"{stage}/{name}: no paper values for {key!r}; add them (with their source) to "
        "tests/paper/paper_values.yaml"
    )
    want = PAPER_VALUES[key]
    view = _view(stage, cfg)
    res = matrix.resources(stage, name)
    processes = res.nodes * res.tasks_per_node
    global_batch = view.get("global_batch") or (
        view["batch_size"] * view.get("accum_steps", 1) * processes
    )
    prefix = "optim" if "optim.base_lr" in view else "solver"
    lr = view[f"{prefix}.base_lr"] * global_batch / view[f"{prefix}.lr_batch_divisor"]
    problems = []
    if global_batch != want["global_batch"]:
        problems.append(
            f"global batch {global_batch} (batch_size {view['batch_size']} x accum_steps "
            f"{view.get('accum_steps', 1)} x {processes} processes), paper {want['global_batch']}"
        )
    if "lr" in want and not math.isclose(lr, want["lr"], rel_tol=1e-6):
        problems.append(f"lr {lr:g} at global batch {global_batch}, paper {want['lr']:g}")
    for path, value in (want.get("config") or {}).items():
        got = view.get(path)
        if got != value and not (
            isinstance(value, float) and isinstance(got, float) and math.isclose(got, value)
        ):
            problems.append(f"{path} = {got!r}, paper {value!r}")
    problems += _schedule_problems(stage, view)
    assert not problems, f"{stage}/{name} ({key}): " + "; ".join(problems)


def _schedule_problems(stage: str, view: dict[str, Any]) -> list[str]:
    """Milestones and warm-up that never happen inside the run (the lr would never decay)."""
    problems = []
    if stage == "pretrain" and view.get("optim.schedule") == "step":
        late = [e for e in view.get("optim.step_epochs") or [] if e >= view["epochs"]]
        if late:
            problems.append(f"step milestones {late} at or past the last epoch {view['epochs']}")
    if stage == "detect":
        late = [s for s in view.get("solver.steps") or [] if s >= view["solver.max_iter"]]
        if late:
            problems.append(f"solver.steps {late} at or past max_iter {view['solver.max_iter']}")
    if view.get("optim.warmup_epochs", 0) >= view.get("epochs", math.inf):
        problems.append(f"warm-up {view['optim.warmup_epochs']} epochs >= {view['epochs']} epochs")
    return problems
