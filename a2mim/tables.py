"""The paper's Tables 1-5 beside our numbers, read from MLflow alone, and an audit of its claims.

Why MLflow only: the store is the one record that every stage run (local, Submitit, SLURM) writes
to, with the tags that say what a run is; result files in run folders may be stale copies.

How a run lands in a table. The workflow tags each downstream run with ``experiment`` (its
config's name) and ``cells``: comma-separated ``<table_key>/<row>/<column>`` names, exactly as in
``paper_tables.yaml`` (a row name may hold ``/``, e.g. ``+ L_freq w/o omega``; the table key is
before the first ``/`` and the column after the last). A cell's number is the final value (at the
largest step) of the column's metric (:func:`column_metric`); an ``*_epochs`` column shows the
``pretrain_epochs`` tag of the runs that fill the row's cells it governs (:func:`epochs_scope`).
Only FINISHED runs count; when several fill one cell the newest (latest end time) wins and the
table says so.

The audit checks the orderings the paper reports that our runs can reproduce: in each metric
column, A2MIM vs SimMIM (in the paper's direction), pretrained vs the supervised row (only where
the paper has the pretrained row ahead), and in Table 5 the paper's ranking of the ablation rows.
Ties in the paper make no claim. Each claim holds, fails (our order differs, ties included) or
was not run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from a2mim import atomic
from a2mim.tracking import DEFAULT_EXPERIMENT, TrackingError, query_runs

PAPER_RESOURCE = "paper_tables.yaml"
COMPARED_METHODS = ("A2MIM", "SimMIM")  # the pretrained rows our methods fill
SUPERVISED_SUFFIX = "(Sup.)"  # "PyTorch (Sup.)", "DeiT (Sup.)": our from-scratch runs
DETECTION_COLUMNS = ("coco_ap_box", "coco_ap_mask")
CSV_FIELDS = ("table", "row", "column", "paper", "ours", "delta", "run_id", "scale")
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
    """Paper and ours in one (row, column); ``ours`` is text when runs disagree on epochs."""

    row: str
    column: str
    paper: float | None
    ours: float | str | None = None
    run_ids: tuple[str, ...] = ()

    @property
    def ran(self) -> bool:
        return bool(self.run_ids)

    @property
    def delta(self) -> float | None:
        if self.paper is None or not isinstance(self.ours, (int, float)):
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
    paper = table.paper(row, column)
    if not runs:
        return Cell(row, column, paper)
    winner, metric = runs[0], column_metric(column)
    if len(runs) > 1:
        older = ", ".join(r.run_id for r in runs[1:])
        notes.append(
            f"{row} / {column}: {len(runs)} finished runs fill this cell; the newest, "
            f"{winner.run_id}, is used (older: {older})."
        )
    value = winner.metrics.get(metric)
    if value is None:
        notes.append(f"{row} / {column}: run {winner.run_id} has no metric {metric!r}.")
    return Cell(row, column, paper, value, (winner.run_id,))


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
                slots[(table.key, row, c)][0]
                for c in epochs_scope(table, column)
                if (table.key, row, c) in slots
            ]
            cells[(row, column)] = _epochs_cell(table, row, column, scope, notes)
    winners = {k: v[0] for k, v in slots.items() if k[0] == table.key}
    detection = [r for (_, _, c), r in winners.items() if c in DETECTION_COLUMNS]
    return TableResult(
        table,
        cells,
        _distinct(winners.values(), "backbone"),
        _distinct(detection, "backend"),
        tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True)
class Claim:
    """The paper ranks ``rows`` best first in ``column``; do our numbers rank them alike?"""

    table: str
    column: str
    rows: tuple[str, ...]
    paper: tuple[float, ...]
    ours: tuple[float | None, ...]
    run_ids: tuple[str | None, ...]

    @property
    def text(self) -> str:
        return " > ".join(self.rows)

    @property
    def verdict(self) -> str:
        """``holds`` if ours are strictly in the paper's order, ``not run`` if any is missing."""
        if any(not isinstance(v, (int, float)) for v in self.ours):
            return "not run"
        ordered = all(a > b for a, b in itertools.pairwise(self.ours))
        return "holds" if ordered else "fails"


def _ranked(result: TableResult, column: str, rows: Sequence[str]) -> Claim | None:
    """The paper's strict ranking of ``rows`` in ``column`` (None when a number is missing or
    tied: the paper then makes no claim)."""
    table = result.paper
    paper = {r: table.paper(r, column) for r in rows}
    if len(rows) < 2 or any(v is None for v in paper.values()):
        return None
    order = sorted(rows, key=lambda r: paper[r], reverse=True)
    if any(paper[a] == paper[b] for a, b in itertools.pairwise(order)):
        return None
    cells = [result.cells[(r, column)] for r in order]
    return Claim(
        table.key,
        column,
        tuple(order),
        tuple(paper[r] for r in order),
        tuple(c.ours for c in cells),
        tuple(c.run_ids[0] if c.run_ids else None for c in cells),
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


def table_claims(result: TableResult) -> list[Claim]:
    """The checkable claims of one table. A table without A2MIM/SimMIM rows is an ablation
    (Table 5): its claim is the paper's ranking of all its rows, per column."""
    table = result.paper
    claims = []
    for column in (c for c in table.columns if not is_epochs(c)):
        if any(m in table.rows for m in COMPARED_METHODS):
            groups = _pairs(table, column)
        else:
            groups = [tuple(table.rows)]
        claims += [c for g in groups if (c := _ranked(result, column, g)) is not None]
    return claims


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: float | str | None, decimals: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def cell_text(cell: Cell, decimals: int) -> str:
    """``paper / ours (delta)``; only the paper's number when we did not run the cell."""
    paper = _fmt(cell.paper, decimals) or "–"
    if not cell.ran:
        return paper
    ours = _fmt(cell.ours, decimals) or "missing"
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
    lines = [
        f"Experiment `{source.experiment}` · scale `{source.scale}` · MLflow `{source.uri}` "
        f"(MLflow experiment `{source.mlflow_experiment}`)",
        f"Backbone(s) used (tag `backbone`): {', '.join(result.backbones) or 'none yet'}",
    ]
    if result.has_detection:
        lines.append(f"Detection backend(s): {', '.join(result.backends) or 'none (no COCO run)'}")
    return lines


def _footnotes(result: TableResult) -> list[str]:
    metrics = sorted({m for c in result.paper.columns if (m := column_metric(c))})
    return [
        "Each cell: paper / ours (Δ = ours − paper); the paper's number alone: not run by us; "
        "–: no number.",
        f"Ours: the final value (at the largest step) of the MLflow metric ({', '.join(metrics)}) "
        "of the FINISHED run whose `cells` tag names the cell; when several finished runs fill "
        "one cell, the newest (latest end time) is used. Epochs: the `pretrain_epochs` tag of "
        "the runs that fill the row's cells.",
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
            ours = _fmt(cell.ours, d) or ("missing" if cell.ran else "")
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


def audit_record(
    claims: Sequence[Claim], results: Mapping[str, TableResult], source: Source
) -> dict[str, Any]:
    """The audit as JSON-ready data: the source, counts per verdict and every claim."""
    counts = {v: sum(c.verdict == v for c in claims) for v in ("holds", "fails", "not run")}
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
                "run_ids": list(c.run_ids),
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
        f"- Holds: {counts['holds']} · fails: {counts['fails']} · not run: {counts['not run']}",
        "",
    ]
    if not source.comparable:
        backbones = sorted({b for r in results.values() for b in r.backbones})
        lines += [_toy_warning(source, backbones), ""]
    body = []
    for c in claims:
        table = results[c.table].paper
        d = max(table.decimals(c.column), 1)
        body.append(
            [
                table.short,
                c.column,
                c.text,
                _claim_numbers(c.paper, d, " > "),
                _claim_numbers(c.ours, d, " vs "),
                c.verdict,
            ]
        )
    lines += _md_grid(
        ["Table", "Column", "Claim (paper's order)", "Paper", "Ours", "Verdict"], body
    )
    lines += [
        "",
        "- Claims: in each metric column, A2MIM vs SimMIM in the paper's order; a pretrained row "
        "above the supervised row where the paper has it there; in an ablation table the paper's "
        "ranking of its rows. Ties in the paper make no claim; a tie in ours fails.",
        "- Ours: the numbers of the tables (newest FINISHED run per cell).",
    ]
    return "\n".join(lines) + "\n"


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
    ``audit.md/.json`` over the selected tables when all are selected or ``audit_only`` (then no
    table files), so that the workflow's per-table targets and its audit target never write the
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
        claims = [c for r in results.values() for c in table_claims(r)]
        files["audit.md"] = render_audit_md(claims, results, source)
        files["audit.json"] = json.dumps(audit_record(claims, results, source), indent=2) + "\n"
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
