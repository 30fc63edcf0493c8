"""Is a difference between two methods signal or noise? Seeds, samples and their 95 % CIs.

Two sources of noise make one number of a run uncertain:

- **seeds**: training randomness (init, data order, augmentation, kernels). Several runs that
  differ only in their seed show it; :func:`seed_summary` gives mean, sample std and the
  t-based 95 % CI of the mean.
- **samples**: the validation set is a finite sample of images. Every evaluation stores its
  per-sample predictions (:mod:`a2mim.predictions`); a *paired* bootstrap resamples the shared
  validation images (the same draw for every run compared) and recomputes each run's metric —
  top-1, COCO AP or mIoU — on the draw (:func:`paired_bootstrap`). For top-1 of two single runs
  McNemar's exact test (:func:`mcnemar_exact`) asks the same question without resampling.

:func:`difference_ci` combines both for ``mean(A) - mean(B)`` over seeds: the variance of the
difference is the seed part ``s_A²/n_A + s_B²/n_B`` (a method with one seed borrows the other's
seed variance; with one seed each there is no seed part) plus the sample part (the variance of
the paired bootstrap of the seed-averaged difference); the interval is ``diff ± t·SE`` with
Welch–Satterthwaite degrees of freedom (the bootstrap part counts as known). Without
predictions the sample part is missing and the interval covers seeds only; with one seed each and
no predictions there is no interval (None): nothing can tell signal from noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
BOOTSTRAP_REPS = 1000
# COCO AP costs draws x detections x IoU thresholds per run; 200 draws estimate its standard
# error to about 5 % (relative), enough for a 95 % CI.
DETECTION_BOOTSTRAP_REPS = 200
BOOTSTRAP_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # bootstrap weights drawn per chunk: reps x samples

ScoreFn = Callable[[np.ndarray], np.ndarray]  # weight rows (r, n) -> metrics (r,), percent


class StatisticsError(ValueError):
    """The inputs cannot give the statistic asked for; the message says why."""


# ---------------------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True)
class SeedSummary:
    """Mean, sample standard deviation (ddof 1; 0 for one seed) and the t-based CI of the mean
    (None for one seed) of one method's runs."""

    values: tuple[float, ...]
    mean: float
    std: float
    low: float | None
    high: float | None

    @property
    def n(self) -> int:
        return len(self.values)


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom
    (the normal's for ``df`` infinite)."""
    if math.isinf(df):
        return float(scipy_stats.norm.ppf(0.5 + level / 2))
    return float(scipy_stats.t.ppf(0.5 + level / 2, df))


def seed_summary(values: Sequence[float], level: float = LEVEL) -> SeedSummary:
    """Mean ± std over seeds and the t-based ``level`` CI of the mean."""
    vals = tuple(float(v) for v in values)
    if not vals:
        raise StatisticsError("seed_summary needs at least one value")
    mean = float(np.mean(vals))
    if len(vals) == 1:
        return SeedSummary(vals, mean, 0.0, None, None)
    std = float(np.std(vals, ddof=1))
    half = t_quantile(len(vals) - 1, level) * std / math.sqrt(len(vals))
    return SeedSummary(vals, mean, std, mean - half, mean + half)


# ---------------------------------------------------------------------------------------------
# Samples: the paired bootstrap and McNemar


def bootstrap_weights(n: int, reps: int, seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Bootstrap draws of ``n`` samples as multiplicity weights: chunks of shape ``(r, n)`` whose
    rows are multinomial counts summing to ``n`` (row ``i`` = how often each sample is drawn),
    ``reps`` rows in all, reproducible from ``seed``."""
    if n < 1 or reps < 1:
        raise StatisticsError(f"a bootstrap needs samples and repetitions (n={n}, reps={reps})")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    done = 0
    while done < reps:
        r = min(per_chunk, reps - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=r)
        done += r


@dataclass(frozen=True)
class Bootstrap:
    """The difference on the full set, its bootstrap draws, their SE and percentile CI."""

    diff: float
    draws: np.ndarray
    n_samples: int
    level: float = LEVEL

    @property
    def se(self) -> float:
        return float(np.std(self.draws, ddof=1))

    @property
    def percentile_ci(self) -> tuple[float, float]:
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(self.draws, [tail, 100 - tail])
        return float(low), float(high)


def bootstrap_scores(
    score: ScoreFn, n: int, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """One run's metric on each of the ``reps`` draws of :func:`bootstrap_weights` (the same
    draws for every run given the same ``n``, ``reps`` and ``seed``: paired). ``score`` maps a
    chunk of weight rows ``(r, n)`` to ``(r,)`` metrics."""
    return np.concatenate(
        [np.asarray(score(w), dtype=np.float64) for w in bootstrap_weights(n, reps, seed)]
    )


def paired_from_draws(
    full_a: Sequence[float],
    full_b: Sequence[float],
    draws_a: Sequence[np.ndarray],
    draws_b: Sequence[np.ndarray],
    n: int,
    level: float = LEVEL,
) -> Bootstrap:
    """The bootstrap of ``mean(A) - mean(B)`` from each run's metric on the full set
    (``full_*``) and on the shared draws (``draws_*``, one array per seed)."""
    if not draws_a or not draws_b:
        raise StatisticsError("a paired bootstrap needs at least one run per method")
    diff = float(np.mean(full_a) - np.mean(full_b))
    return Bootstrap(diff, np.mean(draws_a, axis=0) - np.mean(draws_b, axis=0), n, level)


def paired_bootstrap(
    scores_a: Sequence[ScoreFn],
    scores_b: Sequence[ScoreFn],
    n: int,
    reps: int = BOOTSTRAP_REPS,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> Bootstrap:
    """Bootstrap of ``mean(scores_a) - mean(scores_b)`` over ``n`` shared samples.

    Each score function maps weight rows ``(r, n)`` to a run's metrics ``(r,)``; the lists hold
    one function per seed of each method. Every draw uses the same weights for every run."""
    ones = np.ones((1, n))
    return paired_from_draws(
        [float(f(ones)[0]) for f in scores_a],
        [float(f(ones)[0]) for f in scores_b],
        [bootstrap_scores(f, n, reps, seed) for f in scores_a],
        [bootstrap_scores(f, n, reps, seed) for f in scores_b],
        n,
        level,
    )


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs (``a_only``: A right and B wrong, ``b_only``: the reverse) and the
    exact two-sided p-value of "A and B are equally accurate"."""

    a_only: int
    b_only: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's exact test on paired correctness (binomial test of the discordant pairs)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise StatisticsError(
            f"paired correctness must be two equal 1-d arrays ({a.shape}, {b.shape})"
        )
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    total = a_only + b_only
    if total == 0:
        return McNemar(0, 0, 1.0)
    p = 2 * scipy_stats.binom.cdf(min(a_only, b_only), total, 0.5)
    return McNemar(a_only, b_only, float(min(1.0, p)))


# ---------------------------------------------------------------------------------------------
# Seeds and samples together


@dataclass(frozen=True)
class DifferenceCI:
    """``mean(A) - mean(B)`` and its CI; ``low``/``high`` None when no uncertainty estimate
    exists. ``sources`` says what the CI covers (``seeds``, ``samples``)."""

    diff: float
    low: float | None
    high: float | None
    n_seeds_a: int
    n_seeds_b: int
    n_samples: int | None
    sources: tuple[str, ...]
    se: float | None = None
    df: float | None = None
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    @property
    def sign(self) -> int:
        """+1 if the CI lies above zero, -1 below, 0 if it contains zero or does not exist."""
        if not self.excludes_zero:
            return 0
        return 1 if self.low > 0 else -1


def difference_ci(
    values_a: Sequence[float],
    values_b: Sequence[float],
    bootstrap: Bootstrap | None = None,
    level: float = LEVEL,
) -> DifferenceCI:
    """The ``level`` CI of ``mean(values_a) - mean(values_b)`` from the seeds' spread and the
    paired ``bootstrap`` over samples (of the same seed-averaged difference; None: no
    per-sample predictions). See the module docstring for the formula."""
    sa, sb = seed_summary(values_a), seed_summary(values_b)
    diff = sa.mean - sb.mean
    parts: list[tuple[float, float]] = []  # (variance, degrees of freedom)
    notes = []
    if sa.n > 1 and sb.n > 1:
        parts += [(sa.std**2 / sa.n, sa.n - 1), (sb.std**2 / sb.n, sb.n - 1)]
    elif sa.n > 1 or sb.n > 1:
        known = sa if sa.n > 1 else sb
        parts += [(known.std**2 / known.n, known.n - 1), (known.std**2, known.n - 1)]
        notes.append("the single-seed method is given the other's seed variance")
    sources = ("seeds",) if parts else ()
    if bootstrap is not None:
        parts.append((bootstrap.se**2, math.inf))
        sources += ("samples",)
    if not parts:
        return DifferenceCI(
            diff, None, None, sa.n, sb.n, None, (), note="one seed each and no per-sample "
            "predictions: no uncertainty estimate"
        )  # fmt: skip
    var = sum(v for v, _ in parts)
    finite = [(v, d) for v, d in parts if not math.isinf(d)]
    denom = sum(v * v / d for v, d in finite)
    df = math.inf if denom == 0 else var * var / denom
    se = math.sqrt(var)
    half = t_quantile(df, level) * se
    return DifferenceCI(
        diff,
        diff - half,
        diff + half,
        sa.n,
        sb.n,
        None if bootstrap is None else bootstrap.n_samples,
        sources,
        se,
        df,
        "; ".join(notes),
    )


__all__ = [
    "Bootstrap",
    "DifferenceCI",
    "McNemar",
    "SeedSummary",
    "StatisticsError",
    "bootstrap_scores",
    "bootstrap_weights",
    "difference_ci",
    "mcnemar_exact",
    "paired_bootstrap",
    "paired_from_draws",
    "seed_summary",
    "t_quantile",
]
