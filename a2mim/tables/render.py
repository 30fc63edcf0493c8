"""A table as Markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence

from a2mim.tables.cells import Cell, Source, TableResult
from a2mim.tables.paper import PAPER_DATASET_NAMES, column_metric, paper_dataset
from a2mim.tables.runs import BEST_LAST10_METRIC

CSV_FIELDS = (
    "table", "row", "column", "paper", "ours", "delta", "run_id", "scale",
    "std", "n_seeds", "seeds", "rule", "dataset",
)  # fmt: skip


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
