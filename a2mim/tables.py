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

import csv
import io
import itertools
import json
import math
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from a2mim import atomic, predictions, statistics
from a2mim.tracking import DEFAULT_EXPERIMENT, TrackingError, download_artifact, query_runs

PAPER_RESOURCE = "paper_tables.yaml"
COMPARED_METHODS = ("A2MIM", "SimMIM")  # the pretrained rows our methods fill
SUPERVISED_SUFFIX = "(Sup.)"  # "PyTorch (Sup.)", "DeiT (Sup.)": our from-scratch runs
DETECTION_COLUMNS = ("coco_ap_box", "coco_ap_mask")
CSV_FIELDS = (
    "table", "row", "column", "paper", "ours", "delta", "run_id", "scale",
    "std", "n_seeds", "seeds", "rule", "dataset",
)  # fmt: skip
RULE_FINAL = "final"
RULE_BEST_LAST10 = "best of last 10 epochs"
BEST_LAST10_METRIC = "top1_best_last10"
VERDICTS = ("holds", "fails", "inconclusive", "not run")
PAPER_DATASET_NAMES = {
    "imagenet-1k": "ImageNet-1K",
    "imagenet-100": "ImageNet-100",
    "coco-2017": "COCO 2017",
    "ade20k": "ADE20K",
}
WORKFLOW_HINT = (
    "to make the runs, run the workflow with the config whose `experiment:` is {experiment!r} "
    "(`snakemake --configfile workflow/config/<that config>.yaml all_tables`); if it ran, point "
    "--tracking-uri, $A2MIM_TRACKING_URI or --results at the store it wrote"
)
_NAME_RE = re.compile(r"^[\w.\-]+$")
_SHORT_RE = re.compile(r"^(table\d+)_")


class TablesError(ValueError):
    """The runs or the request cannot make the tables; the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------------
# The paper's tables


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: ``rows[row][i]`` is the number in ``columns[i]`` (None: none)."""

    key: str
    caption: str
    columns: tuple[str, ...]
    rows: Mapping[str, tuple[float | None, ...]]

    @property
    def short(self) -> str:
        """``table1`` for ``table1_resnet50_in1k``: the name of the output files."""
        return _SHORT_RE.match(self.key).group(1)

    def paper(self, row: str, column: str) -> float | None:
        return self.rows[row][self.columns.index(column)]

    def decimals(self, column: str) -> int:
        """Digits after the point in the paper's column, so that ours reads alike."""
        digits = [_decimals(v[self.columns.index(column)]) for v in self.rows.values()]
        known = [d for d in digits if d is not None]
        return max(known) if known else 1


def _decimals(value: float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return 0
    text = repr(float(value))
    return len(text.split(".")[1].rstrip("0")) if "." in text else 0


def load_paper_tables() -> dict[str, PaperTable]:
    """The ``table<N>_*`` entries of the package's copy of the paper's ``paper_tables.yaml``."""
    where = f"a2mim/data/{PAPER_RESOURCE}"
    data = yaml.safe_load(resources.files("a2mim.data").joinpath(PAPER_RESOURCE).read_text())
    tables = {}
    for key, entry in data.items():
        if not _SHORT_RE.match(key):
            continue
        columns = tuple(entry["columns"])
        rows = {}
        for row, values in entry["rows"].items():
            if len(values) != len(columns) or "," in row:
                raise TablesError(
                    f"{where}: {key} row {row!r} must have {len(columns)} values and no ','"
                )
            rows[str(row)] = tuple(values)
        for column in columns:
            column_metric(column)  # an unknown column is an error here, not a blank later
        tables[key] = PaperTable(key, entry["caption"], columns, rows)
    return tables


def is_epochs(column: str) -> bool:
    return column == "epochs" or column.endswith("_epochs")


def column_metric(column: str) -> str | None:
    """The MLflow metric behind a paper column; None for an epochs column (a tag, not a metric).

    ``*_lin``, ``*_ft*`` and Table 5's backbone columns are top-1 (fine-tune, linear probe);
    COCO columns are box/mask AP; ADE20K is mIoU."""
    if is_epochs(column):
        return None
    if column == "coco_ap_box":
        return "ap_box"
    if column == "coco_ap_mask":
        return "ap_mask"
    if column == "ade20k_miou":
        return "miou"
    if column.endswith("_lin") or "_ft" in column or column in ("resnet50", "vit_s"):
        return "top1"
    raise TablesError(
        f"paper column {column!r} has no known metric: add it to a2mim.tables.column_metric"
    )


def paper_dataset(table_key: str, column: str) -> str:
    """The paper's dataset of a column: COCO 2017 (AP), ADE20K (mIoU), ImageNet-100 (Table 5),
    else ImageNet-1K (a key of :data:`PAPER_DATASET_NAMES`)."""
    if column in DETECTION_COLUMNS:
        return "coco-2017"
    if column == "ade20k_miou":
        return "ade20k"
    return "imagenet-100" if table_key.endswith("_in100") else "imagenet-1k"


def epochs_scope(table: PaperTable, column: str) -> tuple[str, ...]:
    """The metric columns whose runs give an epochs column its value: ``fast_epochs`` governs
    ``fast_*``, a bare ``epochs`` every metric column of the table."""
    prefix = "" if column == "epochs" else column.removesuffix("epochs")
    return tuple(c for c in table.columns if not is_epochs(c) and c.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Runs from MLflow


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


Slot = tuple[str, str, str]  # (table key, row, column)


def parse_cell(cell: str, tables: Mapping[str, PaperTable], run_id: str) -> Slot:
    """``table1_resnet50_in1k/A2MIM/fast_lin`` -> its slot, checked against the paper."""
    key, sep, rest = cell.partition("/")
    row, sep2, column = rest.rpartition("/")
    fix = "fix the workflow's cells tag (names exactly as in paper_tables.yaml)"
    if not (sep and sep2) or key not in tables:
        raise TablesError(
            f"run {run_id}: cell {cell!r} is not <table_key>/<row>/<column> with a table key "
            f"of {sorted(tables)}; {fix}"
        )
    table = tables[key]
    if row not in table.rows or column not in table.columns:
        raise TablesError(
            f"run {run_id}: cell {cell!r}: {key} has rows {list(table.rows)} and columns "
            f"{list(table.columns)}; {fix}"
        )
    if is_epochs(column):
        raise TablesError(
            f"run {run_id}: cell {cell!r} names an epochs column, which comes from the "
            f"pretrain_epochs tag of the runs filling the row's metric cells; {fix}"
        )
    return key, row, column


def assign_cells(runs: Sequence[Run], tables: Mapping[str, PaperTable]) -> dict[Slot, list[Run]]:
    """Every filled slot and its runs, newest (latest end time) first."""
    slots: dict[Slot, list[Run]] = {}
    for run in runs:
        for cell in run.cells():
            slots.setdefault(parse_cell(cell, tables, run.run_id), []).append(run)
    for found in slots.values():
        found.sort(key=lambda r: r.end_time, reverse=True)
    return slots


# ---------------------------------------------------------------------------------------------
# One table's numbers


@dataclass(frozen=True)
class Cell:
    """Paper and ours in one (row, column); ``ours`` is text when runs disagree on epochs.

    A metric cell's ``ours`` is the mean of ``values`` (one per seed, from ``runs``), ``std``
    their sample std (None for one seed), ``rule`` which number of a run it is (:func:`run_value`)
    and ``paper_data`` whether every run used the paper's dataset (else no delta)."""

    row: str
    column: str
    paper: float | None
    ours: float | str | None = None
    run_ids: tuple[str, ...] = ()
    values: tuple[float, ...] = ()
    std: float | None = None
    seeds: tuple[str, ...] = ()
    runs: tuple[Run, ...] = ()
    rule: str = ""
    metric: str = ""
    datasets: tuple[str, ...] = ()
    paper_data: bool = True

    @property
    def ran(self) -> bool:
        return bool(self.run_ids)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def delta(self) -> float | None:
        if self.paper is None or not isinstance(self.ours, (int, float)) or not self.paper_data:
            return None
        return round(self.ours - self.paper, 10)


@dataclass(frozen=True)
class TableResult:
    """A paper table with our cells, the setup our runs used, and notes for its footnote."""

    paper: PaperTable
    cells: Mapping[tuple[str, str], Cell]
    backbones: tuple[str, ...]
    backends: tuple[str, ...]  # detection backends of the runs filling COCO cells
    notes: tuple[str, ...]
    datasets: tuple[str, ...] = ()  # dataset tags of the runs filling metric cells

    @property
    def has_detection(self) -> bool:
        return any(c in self.paper.columns for c in DETECTION_COLUMNS)


@dataclass(frozen=True)
class Source:
    """Where the numbers come from; printed with every table and the audit."""

    experiment: str
    uri: str
    mlflow_experiment: str
    scale: str

    @property
    def comparable(self) -> bool:
        return self.scale == "paper"


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _metric_cell(table: PaperTable, row: str, column: str, runs: list[Run], notes: list[str]):
    """Our number of one metric cell: the mean over the newest run of each seed."""
    paper = table.paper(row, column)
    if not runs:
        return Cell(row, column, paper)
    winners = seed_winners(runs)
    older = [r for r in runs if r not in winners]
    if older:
        notes.append(
            f"{row} / {column}: {len(runs)} finished runs fill this cell; the newest of each "
            f"seed, {', '.join(r.run_id for r in winners)}, is used (older: "
            f"{', '.join(r.run_id for r in older)})."
        )
    kept, values, rules = [], [], set()
    for run in winners:
        value, metric, rule = run_value(run, column)
        if value is None:
            notes.append(f"{row} / {column}: run {run.run_id} has no metric {metric!r}.")
            continue
        if run.tags.get("stage") == "finetune" and metric == "top1":
            notes.append(
                f"{row} / {column}: run {run.run_id} logged no {BEST_LAST10_METRIC}; its final "
                "top-1 is used."
            )
        kept.append(run)
        values.append(float(value))
        rules.add(rule)
    datasets = tuple(sorted({r.tags.get("dataset", "unknown") for r in winners}))
    wanted = paper_dataset(table.key, column)
    on_paper_data = all(r.tags.get("paper_dataset") == wanted for r in winners)
    if not values:
        return Cell(row, column, paper, None, tuple(r.run_id for r in winners), datasets=datasets)
    summary = statistics.seed_summary(values)
    return Cell(
        row,
        column,
        paper,
        summary.mean,
        tuple(r.run_id for r in kept),
        tuple(values),
        summary.std if summary.n > 1 else None,
        tuple(r.tags.get("seed", "") for r in kept),
        tuple(kept),
        " + ".join(sorted(rules)),
        column_metric(column),
        datasets,
        on_paper_data,
    )


def _epochs_cell(table: PaperTable, row: str, column: str, runs: list[Run], notes: list[str]):
    """The ``pretrain_epochs`` tag of ``runs`` (the winners of the cells the column governs);
    empty when none has the tag (a from-scratch run has no pre-training)."""
    paper = table.paper(row, column)
    tagged = {r.run_id: r.tags["pretrain_epochs"] for r in runs if "pretrain_epochs" in r.tags}
    run_ids = tuple(tagged)
    values = list(dict.fromkeys(tagged.values()))
    if not values:
        return Cell(row, column, paper)
    if len(values) > 1:
        notes.append(
            f"{row} / {column}: the runs disagree on pretrain_epochs ({', '.join(values)})."
        )
        return Cell(row, column, paper, ",".join(values), run_ids)
    return Cell(row, column, paper, _number(values[0]), run_ids)


def _distinct(runs: Iterable[Run], tag: str) -> tuple[str, ...]:
    return tuple(sorted({r.tags.get(tag, "unknown") for r in runs}))


def build_table(table: PaperTable, slots: Mapping[Slot, list[Run]]) -> TableResult:
    """Our cells of ``table``: metric cells from their newest run, epochs cells from tags."""
    notes: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    for row in table.rows:
        for column in table.columns:
            if not is_epochs(column):
                runs = slots.get((table.key, row, column), [])
                cells[(row, column)] = _metric_cell(table, row, column, runs, notes)
        for column in filter(is_epochs, table.columns):
            scope = [
                run
                for c in epochs_scope(table, column)
                if (table.key, row, c) in slots
                for run in seed_winners(slots[(table.key, row, c)])
            ]
            cells[(row, column)] = _epochs_cell(table, row, column, scope, notes)
    winners = {k: seed_winners(v) for k, v in slots.items() if k[0] == table.key}
    every = [r for runs in winners.values() for r in runs]
    detection = [r for (_, _, c), runs in winners.items() if c in DETECTION_COLUMNS for r in runs]
    datasets = _distinct(every, "dataset")
    withheld = [c for c in cells.values() if c.ran and c.paper is not None and not c.paper_data]
    if withheld:
        needed = sorted({PAPER_DATASET_NAMES[paper_dataset(table.key, c.column)] for c in withheld})
        notes.append(
            f"No delta to the paper in {len(withheld)} cell(s): their runs did not use the "
            f"paper's dataset ({', '.join(needed)}; our runs: {', '.join(datasets)}), so ours "
            "is shown alone. A workflow dataset declared `paper: <name>` tags its runs "
            "`paper_dataset`."
        )
    return TableResult(
        table,
        cells,
        _distinct(every, "backbone"),
        _distinct(detection, "backend"),
        tuple(notes),
        datasets if every else (),
    )


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True)
class Claim:
    """The paper ranks ``rows`` best first in ``column``; do our numbers rank them alike?

    ``cis[i]``: the 95 % CI of ``ours[i] - ours[i + 1]`` (seeds and samples); ``seeds[i]``:
    the number of seeds behind ``ours[i]``."""

    table: str
    column: str
    rows: tuple[str, ...]
    paper: tuple[float, ...]
    ours: tuple[float | None, ...]
    run_ids: tuple[tuple[str, ...], ...]
    cis: tuple[statistics.DifferenceCI, ...] = ()
    seeds: tuple[int, ...] = ()
    std: tuple[float | None, ...] = ()

    @property
    def text(self) -> str:
        return " > ".join(self.rows)

    @property
    def verdict(self) -> str:
        """``not run`` if a number is missing; ``holds`` if every difference in the paper's
        order has a CI above zero, ``fails`` if one has a CI below zero, else ``inconclusive``
        (a CI contains zero, or there is none: one seed and no per-sample predictions)."""
        if any(not isinstance(v, (int, float)) for v in self.ours):
            return "not run"
        if len(self.cis) != len(self.rows) - 1:
            return "inconclusive"
        signs = [ci.sign for ci in self.cis]
        if all(sign == 1 for sign in signs):
            return "holds"
        return "fails" if any(sign == -1 for sign in signs) else "inconclusive"


class Evidence:
    """Per-sample predictions of runs, from their MLflow artifacts (``predictions/*.npz``),
    downloaded into ``folder`` once per run and file."""

    def __init__(self, uri: str, folder: str | Path):
        self.uri, self.folder = uri, Path(folder)
        self._cache: dict[tuple[str, str], predictions.Predictions | None] = {}
        self._draws: dict[tuple[str, str, int], tuple[float, np.ndarray]] = {}

    def load(self, run: Run, column: str) -> predictions.Predictions | None:
        """The predictions behind ``run``'s number in ``column`` (:func:`run_value`): the
        best-of-last-10 evaluation's for that rule, else the final one's; None if not logged."""
        _, metric, _ = run_value(run, column)
        name = predictions.BEST_LAST10 if metric == BEST_LAST10_METRIC else predictions.FINAL
        key = (run.run_id, name)
        if key not in self._cache:
            artifact = f"{predictions.FOLDER}/{name}.npz"
            path = download_artifact(self.uri, run.run_id, artifact, self.folder / run.run_id)
            self._cache[key] = None if path is None else predictions.read(path)
        return self._cache[key]

    def draws(
        self, run: Run, column: str, found: predictions.Predictions
    ) -> tuple[float, np.ndarray]:
        """``run``'s metric on its full validation set and on the shared bootstrap draws
        (computed once per run and metric: a run takes part in several claims)."""
        metric = column_metric(column)
        n = len(found.ids)
        key = (run.run_id, metric, n)
        if key not in self._draws:
            score = predictions.score_for(found, metric)
            reps = statistics.BOOTSTRAP_REPS
            if metric in ("ap_box", "ap_mask"):
                reps = statistics.DETECTION_BOOTSTRAP_REPS
            full = float(score(np.ones((1, n)))[0])
            self._draws[key] = (full, statistics.bootstrap_scores(score, n, reps))
        return self._draws[key]


def pair_ci(upper: Cell, lower: Cell, evidence: Evidence | None) -> statistics.DifferenceCI:
    """The 95 % CI of ``upper - lower`` (seed means) from the seeds and, when every run stored
    predictions on one shared validation set, a paired bootstrap over its samples."""
    boot, why = None, ""
    found = [evidence.load(r, upper.column) for r in (*upper.runs, *lower.runs)] if evidence else []
    missing = [
        r.run_id for r, p in zip((*upper.runs, *lower.runs), found, strict=False) if p is None
    ]
    if evidence is None:
        why = "per-sample predictions not read"
    elif missing:
        why = f"no per-sample predictions for run(s) {', '.join(missing)}"
    elif not all(np.array_equal(p.ids, found[0].ids) for p in found):
        why = "the runs' validation samples differ: no paired bootstrap"
    else:
        runs = (*upper.runs, *lower.runs)
        full, draws = zip(
            *(evidence.draws(r, upper.column, p) for r, p in zip(runs, found, strict=True)),
            strict=True,
        )
        n_up = len(upper.runs)
        boot = statistics.paired_from_draws(
            full[:n_up], full[n_up:], draws[:n_up], draws[n_up:], len(found[0].ids)
        )
    if boot is not None and len(found) == 2 and found[0].kind == "classification":
        test = statistics.mcnemar_exact(found[0].correct, found[1].correct)
        why = (
            f"McNemar exact p = {test.p_value:.3g} ({upper.row} alone right on {test.a_only}, "
            f"{lower.row} alone right on {test.b_only} of {len(found[0].ids)} samples)"
        )
    ci = statistics.difference_ci(upper.values, lower.values, boot)
    if why:
        ci = replace(ci, note="; ".join(x for x in (ci.note, why) if x))
    return ci


def _ranked(
    result: TableResult, column: str, rows: Sequence[str], evidence: Evidence | None = None
) -> Claim | None:
    """The paper's strict ranking of ``rows`` in ``column`` (None when a number is missing or
    tied: the paper then makes no claim), with the CI of each adjacent difference of ours."""
    table = result.paper
    paper = {r: table.paper(r, column) for r in rows}
    if len(rows) < 2 or any(v is None for v in paper.values()):
        return None
    order = sorted(rows, key=lambda r: paper[r], reverse=True)
    if any(paper[a] == paper[b] for a, b in itertools.pairwise(order)):
        return None
    cells = [result.cells[(r, column)] for r in order]
    ran = all(isinstance(c.ours, (int, float)) for c in cells)
    cis = tuple(pair_ci(a, b, evidence) for a, b in itertools.pairwise(cells)) if ran else ()
    return Claim(
        table.key,
        column,
        tuple(order),
        tuple(paper[r] for r in order),
        tuple(c.ours for c in cells),
        tuple(c.run_ids for c in cells),
        cis,
        tuple(c.n for c in cells),
        tuple(c.std for c in cells),
    )


def _pairs(table: PaperTable, column: str) -> list[tuple[str, ...]]:
    """Row groups to rank: A2MIM vs SimMIM, and each pretrained row vs the supervised row where
    the paper has the pretrained row ahead."""
    methods = [m for m in COMPARED_METHODS if m in table.rows]
    groups: list[tuple[str, ...]] = [tuple(methods)] if len(methods) == 2 else []
    for sup in (r for r in table.rows if r.endswith(SUPERVISED_SUFFIX)):
        for method in methods:
            paper, base = table.paper(method, column), table.paper(sup, column)
            if paper is not None and base is not None and paper > base:
                groups.append((method, sup))
    return groups


def table_claims(result: TableResult, evidence: Evidence | None = None) -> list[Claim]:
    """The checkable claims of one table. A table without A2MIM/SimMIM rows is an ablation
    (Table 5): its claim is the paper's ranking of all its rows, per column. ``evidence``
    supplies per-sample predictions for the CIs (None: seeds only)."""
    table = result.paper
    claims = []
    for column in (c for c in table.columns if not is_epochs(c)):
        if any(m in table.rows for m in COMPARED_METHODS):
            groups = _pairs(table, column)
        else:
            groups = [tuple(table.rows)]
        claims += [c for g in groups if (c := _ranked(result, column, g, evidence)) is not None]
    return claims


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: float | str | None, decimals: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def ours_text(cell: Cell, decimals: int, pm: str = "±") -> str:
    """Our number: ``mean ± std (n=k)`` over seeds when there are several, else the value."""
    ours = _fmt(cell.ours, decimals)
    if cell.std is None or not ours:
        return ours
    return f"{ours} {pm} {_fmt(cell.std, decimals)} (n={cell.n})"


def cell_text(cell: Cell, decimals: int) -> str:
    """``paper / ours (delta)``; only the paper's number when we did not run the cell; no
    delta when our runs did not use the paper's dataset."""
    paper = _fmt(cell.paper, decimals) or "–"
    if not cell.ran:
        return paper
    ours = ours_text(cell, decimals) or "missing"
    delta = cell.delta
    return f"{paper} / {ours}" + ("" if delta is None else f" ({delta:+.{decimals}f})")


def _toy_warning(source: Source, backbones: Sequence[str]) -> str:
    used = ", ".join(backbones) if backbones else "none yet (no cell run)"
    return (
        f"**Toy scale ({source.scale}): these numbers are NOT comparable to the paper's.** Our "
        f"runs use stand-in backbones and data, not the paper's setup in the caption; backbone(s) "
        f"used: {used}."
    )


def _header_lines(result: TableResult, source: Source) -> list[str]:
    table = result.paper
    theirs = sorted({PAPER_DATASET_NAMES[paper_dataset(table.key, c)] for c in table.columns})
    lines = [
        f"Experiment `{source.experiment}` · scale `{source.scale}` · MLflow `{source.uri}` "
        f"(MLflow experiment `{source.mlflow_experiment}`)",
        f"Backbone(s) used (tag `backbone`): {', '.join(result.backbones) or 'none yet'}",
        f"Dataset(s) used (tag `dataset`): {', '.join(result.datasets) or 'none yet'} · the "
        f"paper's: {', '.join(theirs)}",
    ]
    if result.has_detection:
        lines.append(f"Detection backend(s): {', '.join(result.backends) or 'none (no COCO run)'}")
    return lines


def _rules(result: TableResult) -> str:
    """Which number of a run each column's cells show (:func:`run_value`)."""
    by_column: dict[str, set[str]] = {}
    for cell in result.cells.values():
        if cell.rule:
            by_column.setdefault(cell.column, set()).update(cell.rule.split(" + "))
    if not by_column:
        return ""
    parts = [f"{c}: {' + '.join(sorted(r))}" for c, r in by_column.items()]
    return (
        f"Rule per column ({'; '.join(parts)}): fine-tuning cells take the best top-1 of the "
        f"last 10 epochs (`{BEST_LAST10_METRIC}`, the authors' rule; the final top-1 is "
        "`top1_final` in experiment.md); every other cell takes the final evaluation."
    )


def _footnotes(result: TableResult) -> list[str]:
    metrics = sorted({m for c in result.paper.columns if (m := column_metric(c))})
    rules = _rules(result)
    return [
        "Each cell: paper / ours (Δ = ours − paper); ours as mean ± sample std (n=seeds) when "
        "several seeds ran; the paper's number alone: not run by us; –: no number.",
        f"Ours: the value at the largest step of the MLflow metric ({', '.join(metrics)}) of "
        "the FINISHED runs whose `cells` tag names the cell; when several finished runs with "
        "one seed fill a cell, the newest (latest end time) is used. Epochs: the "
        "`pretrain_epochs` tag of the runs that fill the row's cells.",
        *([rules] if rules else []),
        *result.notes,
    ]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A pipe table padded to column widths, so it also reads well in a terminal."""
    grid = [list(map(_md_escape, header))] + [list(map(_md_escape, r)) for r in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(grid[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in grid[1:]
    ]


def render_markdown(result: TableResult, source: Source) -> str:
    table = result.paper
    number = table.short.removeprefix("table")
    lines = [f"## Table {number}: {table.caption} (`{table.key}`)", ""]
    lines += [f"- {line}" for line in _header_lines(result, source)] + [""]
    if not source.comparable:
        lines += [_toy_warning(source, result.backbones), ""]
    decimals = {c: table.decimals(c) for c in table.columns}
    body = [
        [row] + [cell_text(result.cells[(row, c)], decimals[c]) for c in table.columns]
        for row in table.rows
    ]
    lines += [*_md_grid(["Method", *table.columns], body), ""]
    lines += [f"- {note}" for note in _footnotes(result)]
    return "\n".join(lines) + "\n"


def _csv_value(value: float | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(value)


def render_csv(result: TableResult, source: Source) -> str:
    """One row per (row, column) cell of the paper's table, ours empty where not run."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in result.paper.rows:
        for column in result.paper.columns:
            cell = result.cells[(row, column)]
            writer.writerow(
                [
                    result.paper.key,
                    row,
                    column,
                    _csv_value(cell.paper),
                    _csv_value(cell.ours),
                    _csv_value(cell.delta),
                    ";".join(cell.run_ids),
                    source.scale if cell.ran else "",
                    _csv_value(cell.std),
                    str(cell.n) if cell.values else "",
                    ";".join(cell.seeds),
                    cell.rule,
                    ";".join(cell.datasets),
                ]
            )
    return out.getvalue()


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "Δ": r"$\Delta$",
    "−": "$-$",
    "·": r"$\cdot$",
    "±": r"$\pm$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def render_latex(result: TableResult, source: Source) -> str:
    """A booktabs tabular (per paper column three sub-columns: paper, ours, delta), then its
    notes as a footnote-size paragraph."""
    table = result.paper
    lines = [f"% {table.short}: {table.caption} ({table.key}); needs \\usepackage{{booktabs}}"]
    lines += [f"\\begin{{tabular}}{{l{'rrr' * len(table.columns)}}}", r"\toprule"]
    heads = [f"\\multicolumn{{3}}{{c}}{{{latex_escape(c)}}}" for c in table.columns]
    lines.append(" & ".join(["", *heads]) + r" \\")
    rules = [f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(table.columns))]
    lines.append(" ".join(rules))
    lines.append(" & ".join(["Method", *(["paper", "ours", r"$\Delta$"] * len(table.columns))]))
    lines[-1] += r" \\"
    lines.append(r"\midrule")
    for row in table.rows:
        values = [latex_escape(row)]
        for column in table.columns:
            cell, d = result.cells[(row, column)], table.decimals(column)
            delta = "" if cell.delta is None else f"{cell.delta:+.{d}f}"
            ours = ours_text(cell, d) or ("missing" if cell.ran else "")
            values += [_fmt(cell.paper, d) or "--", latex_escape(ours), delta]
        lines.append(" & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    # The notes follow the tabular as a paragraph, which wraps at the line width (a note in a
    # \multicolumn would not wrap and would widen the table).
    notes = _header_lines(result, source)
    if not source.comparable:
        notes.insert(0, _toy_warning(source, result.backbones))
    cells = (
        "Per column: paper, ours, $\\Delta$ = ours $-$ paper; ours empty: not run; --: no number."
    )
    lines += [r"\par\smallskip", r"{\footnotesize"]
    for note in [*notes, cells, *_footnotes(result)[1:]]:
        text = note if note is cells else latex_escape(note.replace("`", ""))
        lines.append(re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", text) + r"\par")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _claim_numbers(values: Sequence[float | None], decimals: int, sep: str) -> str:
    return sep.join(_fmt(v, decimals) if v is not None else "not run" for v in values)


def _claim_ours(c: Claim, decimals: int) -> str:
    """Ours per row, ``mean ± std`` where a row has several seeds."""
    parts = []
    for i, value in enumerate(c.ours):
        text = _fmt(value, decimals) if value is not None else "not run"
        std = c.std[i] if i < len(c.std) else None
        parts.append(text if std is None else f"{text} ± {_fmt(std, decimals)}")
    return " vs ".join(parts)


def _ci_text(ci: statistics.DifferenceCI, decimals: int) -> str:
    if ci.low is None:
        return f"{ci.diff:+.{decimals}f} [no CI]"
    return f"{ci.diff:+.{decimals}f} [{ci.low:+.{decimals}f}, {ci.high:+.{decimals}f}]"


def _ci_record(ci: statistics.DifferenceCI) -> dict[str, Any]:
    return {
        "diff": ci.diff,
        "low": ci.low,
        "high": ci.high,
        "se": ci.se,
        "df": None if ci.df is None or math.isinf(ci.df) else ci.df,
        "level": statistics.LEVEL,
        "sources": list(ci.sources),
        "n_seeds": [ci.n_seeds_a, ci.n_seeds_b],
        "n_samples": ci.n_samples,
        "note": ci.note,
    }


def audit_record(
    claims: Sequence[Claim], results: Mapping[str, TableResult], source: Source
) -> dict[str, Any]:
    """The audit as JSON-ready data: the source, counts per verdict and every claim with the
    CI of each adjacent difference (``cis``), the seeds per row and the sample counts."""
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    return {
        "experiment": source.experiment,
        "scale": source.scale,
        "tracking_uri": source.uri,
        "mlflow_experiment": source.mlflow_experiment,
        "comparable_to_paper": source.comparable,
        "tables": [r.paper.short for r in results.values()],
        "counts": counts,
        "claims": [
            {
                "table": c.table,
                "short": results[c.table].paper.short,
                "column": c.column,
                "metric": column_metric(c.column),
                "claim": c.text,
                "rows": list(c.rows),
                "paper": list(c.paper),
                "ours": list(c.ours),
                "std": list(c.std),
                "seeds": list(c.seeds),
                "run_ids": [list(ids) for ids in c.run_ids],
                "cis": [_ci_record(ci) for ci in c.cis],
                "verdict": c.verdict,
            }
            for c in claims
        ],
    }


def render_audit_md(
    claims: Sequence[Claim], results: Mapping[str, TableResult], source: Source
) -> str:
    record = audit_record(claims, results, source)
    counts = record["counts"]
    lines = [
        f"## Audit of the paper's claims: experiment `{source.experiment}`",
        "",
        f"- Scale `{source.scale}` · MLflow `{source.uri}` "
        f"(MLflow experiment `{source.mlflow_experiment}`)",
        f"- Holds: {counts['holds']} · fails: {counts['fails']} · inconclusive: "
        f"{counts['inconclusive']} · not run: {counts['not run']}",
        "",
    ]
    if not source.comparable:
        backbones = sorted({b for r in results.values() for b in r.backbones})
        lines += [_toy_warning(source, backbones), ""]
    body, notes = [], []
    for c in claims:
        table = results[c.table].paper
        d = max(table.decimals(c.column), 1)
        samples = sorted({ci.n_samples for ci in c.cis if ci.n_samples is not None})
        body.append(
            [
                table.short,
                c.column,
                c.text,
                _claim_numbers(c.paper, d, " > "),
                _claim_ours(c, d),
                "; ".join(_ci_text(ci, d) for ci in c.cis) or "–",
                " vs ".join(map(str, c.seeds)) if c.cis else "–",
                ", ".join(map(str, samples)) or "–",
                c.verdict,
            ]
        )
        for a, b, ci in zip(c.rows, c.rows[1:], c.cis, strict=False):
            if ci.note:
                notes.append(f"{table.short} / {c.column} / {a} − {b}: {ci.note}.")
    lines += _md_grid(
        [
            "Table",
            "Column",
            "Claim (paper's order)",
            "Paper",
            "Ours",
            "Difference [95 % CI]",
            "Seeds",
            "Samples",
            "Verdict",
        ],
        body,
    )
    lines += [
        "",
        "- Claims: in each metric column, A2MIM vs SimMIM in the paper's order; a pretrained row "
        "above the supervised row where the paper has it there; in an ablation table the paper's "
        "ranking of its rows. Ties in the paper make no claim.",
        "- Verdicts: for each pair of rows in the paper's order, the difference of ours (upper "
        "− lower, means over seeds) and its 95 % CI from the seeds (t-based, Welch) and from a "
        "paired bootstrap over the shared validation samples (images for AP / mIoU; "
        f"{statistics.BOOTSTRAP_REPS} draws, {statistics.DETECTION_BOOTSTRAP_REPS} for COCO AP) of the per-sample predictions the runs stored. "
        "`holds`: every CI above zero; `fails`: a CI below zero; `inconclusive`: a CI contains "
        "zero, or no CI exists (one seed each and no per-sample predictions): our runs cannot "
        "tell the order from noise.",
        "- Ours: the numbers of the tables (per seed the newest FINISHED run; fine-tuning: best "
        "top-1 of the last 10 epochs). Seeds: runs per row. Samples: validation samples of the "
        "bootstrap.",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The experiment table: every run, also those that fill no paper cell

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


# ---------------------------------------------------------------------------------------------
# The command


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
    "Claim",
    "PaperTable",
    "TablesError",
    "build_table",
    "column_metric",
    "load_paper_tables",
    "render_outputs",
    "table_claims",
    "write_tables",
]
