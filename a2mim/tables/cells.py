"""One table's cells: which runs fill a (row, column) and the number they give."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from a2mim import statistics
from a2mim.tables.paper import (
    DETECTION_COLUMNS,
    PAPER_DATASET_NAMES,
    PaperTable,
    TablesError,
    column_metric,
    epochs_scope,
    is_epochs,
    paper_dataset,
)
from a2mim.tables.runs import BEST_LAST10_METRIC, Run, run_value, seed_winners

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
