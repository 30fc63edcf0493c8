"""The audit: do our numbers rank the rows as the paper does, with 95 % CIs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from a2mim import predictions, statistics
from a2mim.tables.cells import Cell, Source, TableResult
from a2mim.tables.paper import PaperTable, column_metric, is_epochs
from a2mim.tables.render import _fmt, _md_grid, _toy_warning
from a2mim.tables.runs import BEST_LAST10_METRIC, Run, run_value
from a2mim.tracking import download_artifact

COMPARED_METHODS = ("A2MIM", "SimMIM")  # the pretrained rows our methods fill
SUPERVISED_SUFFIX = "(Sup.)"  # "PyTorch (Sup.)", "DeiT (Sup.)": our from-scratch runs
VERDICTS = ("holds", "fails", "inconclusive", "not run")


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
