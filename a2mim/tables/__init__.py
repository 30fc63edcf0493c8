"""The paper's Tables 1-5 beside our numbers, read from MLflow alone, and an audit of its claims.

Why MLflow only: the store is the one record that every stage run (local, Submitit, SLURM) writes
to, with the tags that say what a run is; result files in run folders may be stale copies.

How a run lands in a table. The workflow tags each downstream run with ``experiment`` (its
config's name) and ``cells``: comma-separated ``<table_key>/<row>/<column>`` names, exactly as in
``paper_tables.yaml`` (a row name may hold ``/``, e.g. ``+ L_freq w/o omega``; the table key is
before the first ``/`` and the column after the last). A cell's number is the final value (at the
largest step) of the column's metric (:func:`column_metric`); an ``*_epochs`` column shows the
``pretrain_epochs`` tag of the runs that fill the row's cells it governs (:func:`epochs_scope`).
Only FINISHED runs count; when several fill one cell with the same ``seed`` tag the newest
(latest end time) wins and the table says so. Runs of one cell with different seeds (a workflow
run with ``seeds:``) give the cell their mean ± sample std and n.

Which number of a run (:func:`run_value`): a fine-tuning run's top-1 is the best of its last 10
epochs (``top1_best_last10``, the authors' rule; a run that lacks it gives its final top-1 and
the table says so); every other cell takes the final evaluation. A cell shows a delta to the
paper only when its runs used the paper's dataset (the ``paper_dataset`` tag the workflow sets
from a dataset's ``paper:`` key); otherwise ours alone, and the table says why.

The audit checks the orderings the paper reports that our runs can reproduce: in each metric
column, A2MIM vs SimMIM (in the paper's direction), pretrained vs the supervised row (only where
the paper has the pretrained row ahead), and in Table 5 the paper's ranking of the ablation rows.
Ties in the paper make no claim. For each pair of rows in the paper's order it computes the
95 % CI of our difference from the seeds and from a paired bootstrap over the validation samples
(the per-sample predictions every evaluation stores, :mod:`a2mim.predictions`,
:mod:`a2mim.statistics`). A claim ``holds`` when every CI lies above zero, ``fails`` when one
lies below zero, is ``inconclusive`` when a CI contains zero or cannot be estimated (one seed
and no predictions), and ``not run`` when a row has no number.

Besides the paper's tables, ``experiment.md/.csv`` list every finished run of the experiment
(run, stage, method, backbone, dataset, init, seed and every metric), also those that fill no
paper cell.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from a2mim import atomic
from a2mim.tables.audit import (
    COMPARED_METHODS,
    SUPERVISED_SUFFIX,
    VERDICTS,
    Claim,
    Evidence,
    audit_record,
    pair_ci,
    render_audit_md,
    table_claims,
)
from a2mim.tables.cells import (
    Cell,
    Slot,
    Source,
    TableResult,
    assign_cells,
    build_table,
    parse_cell,
)
from a2mim.tables.experiment import (
    EXPERIMENT_FIELDS,
    experiment_rows,
    render_experiment_csv,
    render_experiment_md,
)
from a2mim.tables.paper import (
    DETECTION_COLUMNS,
    PAPER_DATASET_NAMES,
    PAPER_RESOURCE,
    PaperTable,
    TablesError,
    column_metric,
    epochs_scope,
    is_epochs,
    load_paper_tables,
    paper_dataset,
)
from a2mim.tables.render import (
    CSV_FIELDS,
    cell_text,
    latex_escape,
    ours_text,
    render_csv,
    render_latex,
    render_markdown,
)
from a2mim.tables.runs import (
    BEST_LAST10_METRIC,
    RULE_BEST_LAST10,
    RULE_FINAL,
    WORKFLOW_HINT,
    Run,
    experiment_scale,
    finished_runs,
    run_value,
    seed_winners,
)
from a2mim.tracking import DEFAULT_EXPERIMENT


def select_tables(tables: Mapping[str, PaperTable], names: Sequence[str] | None) -> list[str]:
    """Table keys for ``names`` (``table1`` or ``table1_resnet50_in1k``), in the paper's order;
    all of them for None or an empty list."""
    if not names:
        return list(tables)
    by_name = {t.short: k for k, t in tables.items()} | {k: k for k in tables}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        valid = [f"{t.short} ({k})" for k, t in tables.items()]
        raise TablesError(f"unknown table(s) {unknown}; choose from {', '.join(valid)}")
    chosen = {by_name[n] for n in names}
    return [k for k in tables if k in chosen]


def render_outputs(
    experiment: str,
    uri: str,
    names: Sequence[str] | None = None,
    audit_only: bool = False,
    mlflow_experiment: str = DEFAULT_EXPERIMENT,
) -> dict[str, str]:
    """File name -> text of the outputs; reads MLflow and writes nothing.

    ``<short>.md/.csv/.tex`` for each selected table (all for ``names`` None), and
    ``audit.md/.json`` over the selected tables plus ``experiment.md/.csv`` (every run) when all
    are selected or ``audit_only`` (then no table files), so that the workflow's per-table targets and its audit target never write the
    same file."""
    tables = load_paper_tables()
    keys = select_tables(tables, names)
    runs = finished_runs(experiment, uri, mlflow_experiment)
    source = Source(experiment, uri, mlflow_experiment, experiment_scale(runs, experiment))
    slots = assign_cells(runs, tables)  # every cells tag is checked, also of other tables
    results = {k: build_table(tables[k], slots) for k in keys}
    files: dict[str, str] = {}
    for key, result in results.items() if not audit_only else ():
        short = tables[key].short
        files[f"{short}.md"] = render_markdown(result, source)
        files[f"{short}.csv"] = render_csv(result, source)
        files[f"{short}.tex"] = render_latex(result, source)
    if audit_only or not names:
        with tempfile.TemporaryDirectory(prefix="a2mim-audit-") as folder:
            evidence = Evidence(uri, folder)
            claims = [c for r in results.values() for c in table_claims(r, evidence)]
        files["audit.md"] = render_audit_md(claims, results, source)
        files["audit.json"] = json.dumps(audit_record(claims, results, source), indent=2) + "\n"
        files["experiment.md"] = render_experiment_md(runs, source)
        files["experiment.csv"] = render_experiment_csv(runs)
    return files


def write_tables(
    experiment: str,
    out_dir: str | Path,
    uri: str,
    names: Sequence[str] | None = None,
    audit_only: bool = False,
    mlflow_experiment: str = DEFAULT_EXPERIMENT,
) -> list[Path]:
    """Render every output first (:func:`render_outputs`), then write each file atomically into
    ``out_dir``: an error (no runs, mixed scales, a bad cells tag) leaves ``out_dir`` untouched."""
    files = render_outputs(experiment, uri, names, audit_only, mlflow_experiment)
    paths = []
    for name, text in files.items():
        atomic.write_text(Path(out_dir) / name, text)
        paths.append(Path(out_dir) / name)
    return paths


__all__ = [
    "BEST_LAST10_METRIC",
    "COMPARED_METHODS",
    "CSV_FIELDS",
    "DETECTION_COLUMNS",
    "EXPERIMENT_FIELDS",
    "PAPER_DATASET_NAMES",
    "PAPER_RESOURCE",
    "RULE_BEST_LAST10",
    "RULE_FINAL",
    "SUPERVISED_SUFFIX",
    "VERDICTS",
    "WORKFLOW_HINT",
    "Cell",
    "Claim",
    "Evidence",
    "PaperTable",
    "Run",
    "Slot",
    "Source",
    "TableResult",
    "TablesError",
    "assign_cells",
    "audit_record",
    "build_table",
    "cell_text",
    "column_metric",
    "epochs_scope",
    "experiment_rows",
    "experiment_scale",
    "finished_runs",
    "is_epochs",
    "latex_escape",
    "load_paper_tables",
    "ours_text",
    "pair_ci",
    "paper_dataset",
    "parse_cell",
    "render_audit_md",
    "render_csv",
    "render_experiment_csv",
    "render_experiment_md",
    "render_latex",
    "render_markdown",
    "render_outputs",
    "run_value",
    "seed_winners",
    "select_tables",
    "table_claims",
    "write_tables",
]
