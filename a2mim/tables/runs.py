"""The FINISHED MLflow runs of an experiment, and which number of a run a column shows."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from a2mim.tables.paper import TablesError, column_metric
from a2mim.tracking import DEFAULT_EXPERIMENT, TrackingError, query_runs

RULE_FINAL = "final"
RULE_BEST_LAST10 = "best of last 10 epochs"
BEST_LAST10_METRIC = "top1_best_last10"
WORKFLOW_HINT = (
    "to make the runs, run the workflow with the config whose `experiment:` is {experiment!r} "
    "(`snakemake --configfile workflow/config/<that config>.yaml all_tables`); if it ran, point "
    "--tracking-uri, $A2MIM_TRACKING_URI or --results at the store it wrote"
)
_NAME_RE = re.compile(r"^[\w.\-]+$")


@dataclass(frozen=True)
class Run:
    """A FINISHED MLflow run, as the tables need it."""

    run_id: str
    end_time: int
    tags: Mapping[str, str]
    metrics: Mapping[str, float]

    @classmethod
    def from_query(cls, row: Mapping[str, Any]) -> Run:
        return cls(row["run_id"], row["end_time"] or 0, row["tags"], row["metrics"])

    def cells(self) -> list[str]:
        return [c.strip() for c in self.tags.get("cells", "").split(",") if c.strip()]

    @property
    def name(self) -> str:
        return self.tags.get("run_name", self.run_id)


def run_value(run: Run, column: str) -> tuple[float | None, str, str]:
    """``(value, metric, rule)`` of ``run`` in a metric column: a fine-tuning run's top-1 is
    the best of its last 10 epochs (``top1_best_last10``) when logged, else its final ``top1``;
    every other run's metric is its final value."""
    metric = column_metric(column)
    finetune = metric == "top1" and run.tags.get("stage") == "finetune"
    if finetune and BEST_LAST10_METRIC in run.metrics:
        return run.metrics[BEST_LAST10_METRIC], BEST_LAST10_METRIC, RULE_BEST_LAST10
    return run.metrics.get(metric), metric, RULE_FINAL


def seed_winners(runs: Sequence[Run]) -> list[Run]:
    """The newest run (``runs`` are newest first) of each ``seed`` tag, ordered by seed (runs
    without the tag count as one seed)."""
    by_seed: dict[str, Run] = {}
    for run in runs:
        by_seed.setdefault(run.tags.get("seed", ""), run)
    return [by_seed[k] for k in sorted(by_seed, key=_seed_key)]


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.isdigit() else (-1, seed)


def finished_runs(
    experiment: str, uri: str, mlflow_experiment: str = DEFAULT_EXPERIMENT
) -> list[Run]:
    """The FINISHED runs tagged ``experiment`` in the store, oldest first.

    Raises TablesError when there is none, naming the store, the experiments that are there and
    how to make the runs."""
    if not _NAME_RE.match(experiment):
        raise TablesError(
            f"experiment name {experiment!r}: use letters, digits, '_', '-' and '.' only"
        )
    hint = WORKFLOW_HINT.format(experiment=experiment)
    try:
        rows = query_runs(uri, mlflow_experiment, f"tags.experiment = '{experiment}'")
    except TrackingError as exc:
        raise TablesError(f"{exc}; {hint}") from None
    done = [Run.from_query(r) for r in rows if r["status"] == "FINISHED"]
    if done:
        return done
    what = "no run" if not rows else f"{len(rows)} runs but none FINISHED ({_statuses(rows)})"
    others = _experiment_tags(uri, mlflow_experiment)
    raise TablesError(
        f"{what} with tag experiment={experiment!r} in MLflow experiment {mlflow_experiment!r} "
        f"at {uri} (experiments with finished runs there: {others or 'none'}); {hint}"
    )


def _statuses(rows: Iterable[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _experiment_tags(uri: str, mlflow_experiment: str) -> list[str]:
    rows = query_runs(uri, mlflow_experiment, "attributes.status = 'FINISHED'")
    return sorted({r["tags"]["experiment"] for r in rows if "experiment" in r["tags"]})


def experiment_scale(runs: Sequence[Run], experiment: str) -> str:
    """The one ``scale`` tag of the experiment's runs; mixing scales is an error."""
    by_scale: dict[str, str] = {}
    for run in runs:
        by_scale.setdefault(run.tags.get("scale", "unknown"), run.run_id)
    if len(by_scale) > 1:
        seen = ", ".join(f"{s} (e.g. run {r})" for s, r in sorted(by_scale.items()))
        raise TablesError(
            f"the finished runs of experiment {experiment!r} mix scales: {seen}; give each "
            "scale its own experiment name in the workflow config, or delete the stray runs"
        )
    return next(iter(by_scale))
