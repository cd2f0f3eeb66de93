"""The study's statistics on planted data (no training): bootstrap CI, exact sign-flip test, Holm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.study.statistics import (
    bootstrap_band,
    bootstrap_mean_ci,
    compare_paired,
    holm,
    sign_flip_pvalue,
    smallest_pvalue,
)

SEEDS = range(8)


def _study(rng: np.random.Generator, effect: float) -> tuple[dict[int, float], dict[int, float]]:
    """Baseline accuracy per seed (seeds differ a lot) and an arm = baseline + effect + small noise."""
    base = {s: float(v) for s, v in zip(SEEDS, rng.uniform(0.2, 0.6, len(SEEDS)), strict=True)}
    arm = {s: base[s] + effect + float(rng.normal(0, 0.03)) for s in SEEDS}
    return arm, base


def test_a_planted_difference_of_0_1_over_8_seeds_is_found():
    arm, base = _study(np.random.default_rng(0), effect=0.1)
    c = compare_paired(arm, base)
    assert c.n == 8 and c.mean == pytest.approx(0.1, abs=0.03)
    assert 0 < c.ci_low < c.mean < c.ci_high
    assert c.p_value == pytest.approx(2 / 2 ** 8), "every seed improved: only the all-plus and all-minus patterns"


def test_identical_arms_give_a_ci_around_0_and_few_false_positives():
    rng = np.random.default_rng(1)
    arm, base = _study(rng, effect=0.0)
    c = compare_paired(arm, base)
    assert c.ci_low < 0 < c.ci_high and c.p_value > 0.05
    rejections = covered = 0
    for i in range(200):
        arm, base = _study(rng, effect=0.0)
        c = compare_paired(arm, base, samples=2_000, seed=i)
        rejections += c.p_value <= 0.05
        covered += c.ci_low <= 0 <= c.ci_high
    assert rejections / 200 <= 0.08
    assert covered / 200 >= 0.85  # the percentile bootstrap is a little too narrow with 8 seeds


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_sign_flip_p_is_the_share_of_all_sign_patterns(n):
    d = np.random.default_rng(n).normal(0.2, 1, n)
    brute = np.mean([abs(np.dot(signs, d)) >= abs(d.sum()) - 1e-12
                     for signs in itertools.product((1, -1), repeat=n)])
    assert sign_flip_pvalue(d) == pytest.approx(brute)


def test_sign_flip_p_over_more_than_one_block_of_patterns():
    d = np.arange(1, 19, dtype=float)  # all positive: only the two extreme patterns reach |sum|
    assert sign_flip_pvalue(d) == pytest.approx(2 / 2 ** 18)
    assert sign_flip_pvalue(np.zeros(4)) == 1.0
    assert smallest_pvalue(3) == 0.25


def test_holm_on_a_hand_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, float("nan")])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1])


def test_only_shared_seeds_are_paired():
    c = compare_paired({0: 0.5, 1: 0.6, 2: 0.9}, {1: 0.5, 2: 0.5, 3: 0.1})
    assert c.seeds == (1, 2) and c.differences == pytest.approx((0.1, 0.4))
    assert c.sd == pytest.approx(0.3 / np.sqrt(2)), "sample SD (n - 1): the spread the MDE is computed from"
    assert np.isnan(compare_paired({0: 0.5}, {0: 0.4}).sd), "one seed has no spread"


def test_bootstrap_band_brackets_the_mean_curve():
    curves = np.random.default_rng(0).normal(0, 1, (6, 20)) + np.linspace(0, 1, 20)
    lo, hi = bootstrap_band(curves)
    mean = curves.mean(axis=0)
    assert np.all(lo <= mean) and np.all(mean <= hi) and np.all(hi - lo > 0)
    assert bootstrap_mean_ci([0.3]) == (0.3, 0.3)
