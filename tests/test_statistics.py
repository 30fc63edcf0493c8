"""Golden values of a2mim.statistics against independent naive computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from a2mim import statistics as st


def test_seed_summary_is_mean_sample_std_and_t_interval():
    s = st.seed_summary([55.0, 58.0, 56.5])
    assert s.mean == pytest.approx(56.5) and s.n == 3
    naive_std = math.sqrt(((55 - 56.5) ** 2 + (58 - 56.5) ** 2 + 0) / 2)
    assert s.std == pytest.approx(naive_std)
    half = 4.302652729911275 * naive_std / math.sqrt(3)  # t(0.975, df=2), from tables
    assert (s.low, s.high) == pytest.approx((56.5 - half, 56.5 + half))
    one = st.seed_summary([70.0])
    assert (one.mean, one.std, one.low, one.high) == (70.0, 0.0, None, None)
    with pytest.raises(st.StatisticsError):
        st.seed_summary([])


def test_bootstrap_weights_are_multinomial_draws_reproducible_by_seed():
    chunks = list(st.bootstrap_weights(7, 50, seed=3))
    draws = np.concatenate(chunks)
    assert draws.shape == (50, 7) and (draws.sum(axis=1) == 7).all()
    assert (np.concatenate(list(st.bootstrap_weights(7, 50, seed=3))) == draws).all()
    assert not (np.concatenate(list(st.bootstrap_weights(7, 50, seed=4))) == draws).all()


def test_mcnemar_exact_matches_scipy_binomtest_and_enumeration():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.6
    b = np.where(rng.random(200) < 0.2, ~a, a)
    res = st.mcnemar_exact(a, b)
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (res.a_only, res.b_only) == (n01, n10)
    want = scipy_stats.binomtest(n01, n01 + n10, 0.5).pvalue
    assert res.p_value == pytest.approx(want)
    # by hand: 1 vs 9 discordant pairs; P(X <= 1 or X >= 9), X ~ Bin(10, 1/2)
    a2 = np.array([True] * 1 + [False] * 9)
    hand = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10
    assert st.mcnemar_exact(a2, ~a2).p_value == pytest.approx(hand)
    assert st.mcnemar_exact(a2, a2).p_value == 1.0


def test_paired_bootstrap_of_top1_matches_the_analytic_paired_standard_error():
    rng = np.random.default_rng(1)
    n = 2000
    a = rng.random(n) < 0.7
    b = np.where(rng.random(n) < 0.15, ~a, a)

    def top1(correct):
        c = correct.astype(float)
        return lambda w: 100.0 * (w @ c) / w.sum(axis=-1)

    boot = st.paired_bootstrap([top1(a)], [top1(b)], n, reps=2000, seed=0)
    assert boot.diff == pytest.approx(100.0 * (a.mean() - b.mean()))
    d = a.astype(float) - b.astype(float)  # the paired difference per sample
    analytic = 100.0 * d.std(ddof=0) / math.sqrt(n)
    assert boot.se == pytest.approx(analytic, rel=0.08)
    low, high = boot.percentile_ci
    assert low < boot.diff < high


def test_paired_bootstrap_uses_one_draw_for_every_run():
    """Two identical runs: every draw gives a difference of exactly zero (unpaired draws would
    not)."""
    c = (np.arange(100) % 3 == 0).astype(float)

    def f(w):
        return w @ c / w.sum(axis=-1)

    boot = st.paired_bootstrap([f, f], [f], 100, reps=200)
    assert np.allclose(boot.draws, 0.0) and boot.se == 0.0


def test_difference_ci_seeds_only_is_welch():
    a, b = [58.2, 57.1, 59.0], [55.2, 56.0, 54.1]
    ci = st.difference_ci(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = np.mean(a) - np.mean(b)
    assert (ci.low, ci.high) == pytest.approx((diff - half, diff + half))
    assert ci.sources == ("seeds",) and ci.n_samples is None
    # scipy's Welch test agrees on the degrees of freedom
    welch = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert ci.df == pytest.approx(welch.df)


def test_difference_ci_adds_the_sample_variance_and_borrows_a_seed_variance():
    draws = np.array([-1.0, 1.0] * 500)
    boot = st.Bootstrap(2.0, draws, 500)
    only = st.difference_ci([60.0], [58.0], boot)
    se = np.std(draws, ddof=1)
    assert only.sources == ("samples",) and math.isinf(only.df)
    assert (only.low, only.high) == pytest.approx(
        (2 - 1.959963984540054 * se, 2 + 1.96 * se), abs=1e-3
    )
    both = st.difference_ci([60.0, 61.0, 59.0], [58.0], boot)
    s2 = np.var([60.0, 61.0, 59.0], ddof=1)
    var = s2 / 3 + s2 + se**2  # the single seed of B takes A's seed variance
    assert both.se == pytest.approx(math.sqrt(var)) and both.sources == ("seeds", "samples")
    assert "other's seed variance" in both.note
    none = st.difference_ci([60.0], [58.0])
    assert (none.low, none.high, none.sign) == (None, None, 0) and "no uncertainty" in none.note


@pytest.mark.parametrize(("low", "high", "sign"), [(0.5, 2.0, 1), (-2.0, -0.1, -1), (-1.0, 1.0, 0)])
def test_sign_of_a_ci(low, high, sign):
    ci = st.DifferenceCI(1.0, low, high, 1, 1, 10, ("samples",))
    assert ci.sign == sign and ci.excludes_zero == (sign != 0)


def test_t_quantile_against_scipy():
    for df in (1, 2, 4.5, 30):
        assert st.t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df))
    assert st.t_quantile(math.inf) == pytest.approx(1.959963984540054)
    assert next(st.bootstrap_weights(3, 1)).shape == (1, 3)
