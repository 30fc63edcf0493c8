"""The experiment table: every finished run, also those that fill no paper cell."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from a2mim.tables.cells import Source
from a2mim.tables.render import _csv_value, _md_grid
from a2mim.tables.runs import Run, _seed_key

EXPERIMENT_FIELDS = (
    "run", "stage", "method", "backbone", "dataset", "paper_dataset", "init", "seed", "run_id",
)  # fmt: skip


def experiment_rows(runs: Sequence[Run]) -> tuple[list[dict[str, str]], list[str]]:
    """One row per run (by stage, then name, then seed) and the sorted union of metric names."""
    metrics = sorted({m for r in runs for m in r.metrics})
    order = {s: i for i, s in enumerate(("pretrain", "finetune", "linprobe", "detect", "segment"))}
    rows = []
    for run in sorted(
        runs,
        key=lambda r: (
            order.get(r.tags.get("stage", ""), 9),
            r.name,
            _seed_key(r.tags.get("seed", "")),
        ),
    ):
        t = run.tags
        row = {
            "run": run.name,
            "stage": t.get("stage", ""),
            "method": t.get("method", ""),
            "backbone": t.get("backbone", ""),
            "dataset": t.get("dataset", ""),
            "paper_dataset": t.get("paper_dataset", ""),
            "init": t.get("pretrain_run", ""),
            "seed": t.get("seed", ""),
            "run_id": run.run_id,
        }
        rows.append(row | {m: run.metrics[m] for m in metrics if m in run.metrics})
    return rows, metrics


def render_experiment_csv(runs: Sequence[Run]) -> str:
    rows, metrics = experiment_rows(runs)
    out = io.StringIO()
    writer = csv.DictWriter(out, [*EXPERIMENT_FIELDS, *metrics], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) if not isinstance(v, str) else v for k, v in row.items()})
    return out.getvalue()


def render_experiment_md(runs: Sequence[Run], source: Source) -> str:
    """Every finished run of the experiment with its setup and every final metric."""
    rows, _ = experiment_rows(runs)
    lines = [
        f"## Every run of experiment `{source.experiment}`",
        "",
        f"- Scale `{source.scale}` · MLflow `{source.uri}` "
        f"(MLflow experiment `{source.mlflow_experiment}`) · {len(rows)} FINISHED runs",
        "",
    ]
    body = []
    for row in rows:
        metrics = [f"{k}={_metric_text(v)}" for k, v in row.items() if k not in EXPERIMENT_FIELDS]
        dataset = row["dataset"] + (f" ({row['paper_dataset']})" if row["paper_dataset"] else "")
        body.append(
            [
                row["run"],
                row["stage"],
                row["method"],
                row["backbone"],
                dataset,
                row["init"],
                row["seed"],
                ", ".join(metrics),
            ]
        )
    header = ["Run", "Stage", "Method", "Backbone", "Dataset", "Init", "Seed", "Metrics"]
    lines += [*_md_grid(header, body), ""]
    lines += [
        "- Metrics: the value at the largest step of every MLflow metric of the run; "
        "fine-tuning runs have `top1_final` (last epoch) and `top1_best_last10` (best of the "
        "last 10 epochs, the authors' rule). Dataset: the workflow's dataset name (the paper's "
        "dataset in parentheses when declared). Init: the run it started from. The same rows "
        "with one column per metric: experiment.csv."
    ]
    return "\n".join(lines) + "\n"


def _metric_text(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
