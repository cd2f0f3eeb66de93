"""Paired statistics over seeds: bootstrap intervals, the exact sign-flip test, Holm's correction.

A study gives every arm the same seeds, and a seed fixes the prompt order and the first samples,
so the unit of evidence is the per-seed difference arm - baseline. With n seeds the sign-flip
test enumerates all 2^n sign patterns of those differences (exact under the null that the
difference is symmetric about 0); its smallest two-sided p-value is 2 / 2^n (0.25 for 3 seeds).

Power: ``minimum_detectable_effect`` says which true mean difference that test finds 80% of the time
at a study's seed count, from the spread of the per-seed differences, and ``seeds_needed`` how many
seeds a given difference would take (tests/test_study_power.py checks both against simulations of the
test itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 10_000
MAX_EXACT_SEEDS = 24  # 2^24 sign patterns, enumerated in blocks
POWER = 0.8
_BLOCK_BITS = 16


def bootstrap_mean_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    means = x[np.random.default_rng(seed).integers(0, x.size, (samples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_band(curves: np.ndarray, samples: int = 2_000, confidence: float = CONFIDENCE,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the mean curve over seeds; ``curves`` is (seeds, steps), NaN-free."""
    curves = np.asarray(curves, dtype=float)
    rows = np.random.default_rng(seed).integers(0, curves.shape[0], (samples, curves.shape[0]))
    means = curves[rows].mean(axis=1)  # (samples, steps)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail], axis=0)
    return lo, hi


def sign_flip_pvalue(differences: Sequence[float]) -> float:
    """Exact two-sided p-value: the share of all 2^n sign patterns with |sum| >= the observed |sum|."""
    d = np.asarray(differences, dtype=float)
    n = d.size
    if n == 0:
        return float("nan")
    if n > MAX_EXACT_SEEDS:
        raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; n = {n} > {MAX_EXACT_SEEDS}")
    observed = abs(d.sum())
    tolerance = 1e-12 * max(1.0, np.abs(d).sum())  # sums that equal the observed one up to rounding count
    low_bits = min(n, _BLOCK_BITS)
    low = 1 - 2 * ((np.arange(2 ** low_bits)[:, None] >> np.arange(low_bits)) & 1)  # (2^low, low) of +-1
    low_sums = low @ d[:low_bits]
    extreme = 0
    for high in range(2 ** (n - low_bits)):
        signs = 1 - 2 * ((high >> np.arange(n - low_bits)) & 1)
        sums = low_sums + signs @ d[low_bits:]
        extreme += int((np.abs(sums) >= observed - tolerance).sum())
    return extreme / 2 ** n


def smallest_pvalue(n: int) -> float:
    """The smallest p-value the exact two-sided sign-flip test can give with n seeds."""
    return 2 / 2 ** n if n else float("nan")


def attainable_level(n: int, level: float) -> float:
    """The exact test's true size at ``level``: the largest p-value it can give with n seeds that is below
    ``level`` (0 when none is). With continuous differences every p is a multiple of 2 / 2^n, because a
    sign pattern and its negation give the same |sum|; the study rejects when p < level (strictly)."""
    pairs = math.ceil(level * 2 ** (n - 1)) - 1  # largest k with 2k / 2^n < level
    return max(pairs, 0) * 2 / 2 ** n


def minimum_detectable_effect(sd: float, n: int, alpha: float, family: int = 1, power: float = POWER) -> float:
    """Smallest true mean paired difference that the study's test detects with probability ``power``.

    The test is the exact two-sided sign-flip test over n seeds of per-seed differences with standard
    deviation ``sd``, Holm-corrected over ``family`` comparisons. Holm's strictest step is Bonferroni's
    alpha / family (the level the most significant comparison must beat), so the MDE is taken there: an
    upper bound for the other comparisons in the family, which Holm tests at milder levels.

    - The test cannot reject at all when 2 / 2^n >= alpha / family: the MDE is infinite.
    - When only the two all-same-sign patterns reach that level, the test rejects exactly when every
      seed's difference has the same sign; for normal differences the power is Phi(m / sd)^n (the other
      sign adds Phi(-m / sd)^n < 1e-8 at 80% power), so MDE = sd * Phi^-1(power^(1/n)). The t formula
      below would understate it by 20% there (simulated power 0.63 instead of 0.8 at 6 seeds).
    - Otherwise the paired-t approximation at the test's attainable level a (``attainable_level``):
      MDE = (t_{1-a/2, n-1} + t_{power, n-1}) * sd / sqrt(n). The sign-flip test is asymptotically as
      efficient as t for normal data; what remains of its discreteness costs at most a few points of power
      (simulated 0.74-0.80 instead of 0.8 for 7 to 14 seeds at 1 to 3 comparisons).

    NaN when n = 0 or the spread is unknown (sd NaN: fewer than 2 seeds observed).
    """
    if n < 1:
        return float("nan")
    level = attainable_level(n, alpha / family)
    if level == 0:
        return math.inf
    if level == smallest_pvalue(n):
        return float(sd * stats.norm.ppf(power ** (1 / n)))
    quantiles = stats.t.ppf(1 - level / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(quantiles * sd / math.sqrt(n))


def seeds_needed(effect: float, sd: float, alpha: float, family: int = 1, power: float = POWER,
                 max_seeds: int = MAX_EXACT_SEEDS) -> int | None:
    """Fewest seeds whose MDE is at most |effect| (per-seed spread ``sd`` assumed to stay as observed);
    None when no count up to ``max_seeds`` does (the exact test enumerates at most 2^24 patterns) or
    when there is no spread to go on (sd NaN) or no effect to find (0)."""
    if effect == 0 or math.isnan(sd):
        return None
    return next((n for n in range(1, max_seeds + 1)
                 if minimum_detectable_effect(sd, n, alpha, family, power) <= abs(effect)), None)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.size, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class PairedComparison:
    """An arm against the baseline on one metric, over the seeds both have."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # arm - baseline, per seed
    mean: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def sd(self) -> float:
        """Standard deviation of the per-seed differences (n - 1 in the denominator); NaN below 2 seeds."""
        return float(np.std(self.differences, ddof=1)) if self.n > 1 else float("nan")


def compare_paired(arm: dict[int, float], baseline: dict[int, float], samples: int = BOOTSTRAP_SAMPLES,
                   seed: int = 0) -> PairedComparison:
    """Per-seed differences on the seeds both arms finished; mean, bootstrap CI, exact sign-flip p."""
    seeds = tuple(sorted(set(arm) & set(baseline)))
    diffs = np.array([arm[s] - baseline[s] for s in seeds], dtype=float)
    if not seeds:
        return PairedComparison((), (), float("nan"), float("nan"), float("nan"), float("nan"))
    lo, hi = bootstrap_mean_ci(diffs, samples=samples, seed=seed)
    return PairedComparison(seeds, tuple(diffs.tolist()), float(diffs.mean()), lo, hi, sign_flip_pvalue(diffs))
