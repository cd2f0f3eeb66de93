"""What a study could have detected: the MDE and seeds-needed arithmetic against simulations of the study's
own test (the exact sign-flip test at Holm's strictest level), and the verdicts that read it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.study.config import Analysis, parse_study
from pipeline.study.report import ArmComparison, _comparison_rows, _seeds_lines, compare_arms
from pipeline.study.statistics import (
    PairedComparison,
    attainable_level,
    minimum_detectable_effect,
    seeds_needed,
    sign_flip_pvalue,
    smallest_pvalue,
)

ALPHA = 0.05
SIMS = 2000  # binomial SE of a rejection rate near 0.8: 0.009, so 3 SE = 0.027


def _rejection_rate(effect: float, sd: float, n: int, family: int, seed: int) -> float:
    """Share of simulated studies (normal per-seed differences) whose sign-flip p beats alpha / family, as the
    report's Holm p < alpha does for the family's most significant comparison."""
    d = np.random.default_rng(seed).normal(effect, sd, (SIMS, n))
    return float(np.mean([sign_flip_pvalue(x) < ALPHA / family for x in d]))


@pytest.mark.parametrize(("n", "family", "low"), [
    (6, 1, 0.77),  # only the all-same-sign patterns reject: the closed form is exact, so 0.8 +- 3 SE
    (10, 1, 0.74),  # paired-t approximation: the test's discreteness costs up to 0.03 here (simulated 0.78-0.80)
    (9, 3, 0.71),  # ... and up to 0.06 at 3 comparisons (simulated 0.76-0.77; 0.74 at 8 seeds): 0.8 - 0.06 - 3 SE
])
def test_the_sign_flip_test_finds_the_mde_80_percent_of_the_time(n, family, low):
    sd = 0.05  # a typical per-seed spread of held-out accuracy differences
    mde = minimum_detectable_effect(sd, n, ALPHA, family)
    assert math.isfinite(mde) and mde > 0
    assert low <= _rejection_rate(mde, sd, n, family, seed=n) <= 0.83
    assert _rejection_rate(mde / 2, sd, n, family, seed=n + 1) < 0.5, "half the MDE is found far less often"
    # no effect: the rate is the test's attainable size, at most alpha / family (+ 3 SE)
    assert _rejection_rate(0.0, sd, n, family, seed=n + 2) <= ALPHA / family + 3 * math.sqrt(ALPHA / family / SIMS)


def test_mde_numbers():
    # closed form at 6 seeds: Phi^-1(0.8^(1/6)) sd
    assert minimum_detectable_effect(1.0, 6, ALPHA) == pytest.approx(1.7927, abs=1e-4)
    # t form at 10 seeds, attainable level 50/1024: (t_{1-0.0244, 9} + t_{0.8, 9}) / sqrt(10)
    assert attainable_level(10, ALPHA) == pytest.approx(50 / 1024)
    assert minimum_detectable_effect(1.0, 10, ALPHA) == pytest.approx(0.9993, abs=1e-4)
    assert minimum_detectable_effect(2.0, 10, ALPHA) == pytest.approx(2 * 0.9993, abs=2e-4), "linear in sd"
    assert minimum_detectable_effect(1.0, 10, ALPHA, family=3) > minimum_detectable_effect(1.0, 10, ALPHA)
    assert minimum_detectable_effect(1.0, 10, ALPHA, power=0.9) > minimum_detectable_effect(1.0, 10, ALPHA)
    assert math.isnan(minimum_detectable_effect(1.0, 0, ALPHA))
    assert math.isnan(minimum_detectable_effect(float("nan"), 8, ALPHA))


@pytest.mark.parametrize(("n", "family"), [(1, 1), (3, 1), (5, 1), (6, 2), (7, 4), (8, 20)])
def test_the_mde_is_infinite_where_the_exact_test_cannot_reject(n, family):
    assert smallest_pvalue(n) >= ALPHA / family and attainable_level(n, ALPHA / family) == 0
    assert minimum_detectable_effect(0.01, n, ALPHA, family) == math.inf
    assert math.isfinite(minimum_detectable_effect(0.01, n + 1, ALPHA, family)) == (smallest_pvalue(n + 1) < ALPHA
                                                                                     / family)


@pytest.mark.parametrize(("effect", "sd", "family", "expected"), [
    (1.0, 1.0, 1, 10),  # MDE 1.079 sd at 9 seeds, 0.999 at 10
    (0.7, 1.0, 1, 19),  # MDE 0.7008 sd at 18 seeds, 0.6798 at 19
    (1.0, 1.0, 3, 14),  # 3 comparisons: 1.013 sd at 13 seeds, 0.967 at 14
    (0.02, 0.0, 1, 6),  # no spread: the fewest seeds whose smallest p beats alpha
    (0.02, 0.0, 3, 7),
])
def test_seeds_needed_is_the_fewest_seeds_whose_mde_is_small_enough(effect, sd, family, expected):
    n = seeds_needed(effect, sd, ALPHA, family)
    assert n == expected
    assert minimum_detectable_effect(sd, n, ALPHA, family) <= effect
    assert all(minimum_detectable_effect(sd, m, ALPHA, family) > effect for m in range(1, n))
    assert seeds_needed(-effect, sd, ALPHA, family) == n, "a difference of either sign"


def test_seeds_needed_gives_up_past_the_exact_tests_limit():
    assert minimum_detectable_effect(1.0, 24, ALPHA) == pytest.approx(0.5973, abs=1e-4)
    assert seeds_needed(0.1, 1.0, ALPHA) is None
    assert seeds_needed(0.0, 1.0, ALPHA) is None and seeds_needed(0.1, float("nan"), ALPHA) is None


def _comparison(differences: list[float], ci: tuple[float, float], p_holm: float, family: int = 1) -> ArmComparison:
    d = np.asarray(differences)
    paired = PairedComparison(tuple(range(d.size)), tuple(d.tolist()), float(d.mean()), *ci, p_holm / family)
    return ArmComparison("delta", "none", "final_accuracy", paired, p_holm, family)


DIFFS = [0.03, -0.02, 0.05, 0.01, -0.04, 0.06, 0.00, 0.02]  # sd 0.034: MDE 0.040 at 8 seeds, 1 comparison


def test_verdicts_read_the_ci_against_the_mde():
    mde = _comparison(DIFFS, (0, 0), 1.0).mde(ALPHA)
    assert mde == pytest.approx(1.1683 * np.std(DIFFS, ddof=1), rel=1e-3)
    assert _comparison(DIFFS, (-1.1 * mde, 1.1 * mde), 0.6).verdict(ALPHA) == "too small to tell"
    assert _comparison(DIFFS, (-0.2 * mde, 1.3 * mde), 0.3).verdict(ALPHA) == "too small to tell"
    assert _comparison(DIFFS, (-0.9 * mde, 0.9 * mde), 0.6).verdict(ALPHA) == "not significant"
    significant = _comparison(DIFFS, (0.2 * mde, 1.5 * mde), 0.0078)
    assert significant.verdict(ALPHA) == "significant, delta better"
    sentence = _comparison(DIFFS, (-1.1 * mde, 1.1 * mde), 0.6).sentence(ALPHA)
    assert sentence.endswith(f"over 8 seeds: too small to tell (MDE +/-{mde:.3f} at 80% power)")
    few = _comparison([0.1, 0.1, 0.1], (0.1, 0.1), 0.25)
    assert few.mde(ALPHA) == math.inf and few.verdict(ALPHA) == "too small to tell", "3 seeds cannot reject"
    assert few.sentence(ALPHA).endswith("too small to tell (no difference is detectable with 3 seeds)")


def test_the_comparisons_table_and_the_seeds_lines_carry_the_mde():
    base = np.linspace(0.3, 0.6, 8)
    summary = pd.DataFrame([{"arm": arm, "seed": s, "final_accuracy": base[s] + shift + noise,
                             "reward_auc": base[s], "steps_to_threshold": 10.0}
                            for s in range(8) for arm, shift, noise in
                            (("none", 0, 0), ("delta", 0.02, DIFFS[s]), ("same", 0, 0.001 * (-1) ** s))])
    analysis = Analysis(effect_of_interest={"final_accuracy": 0.05})
    comparisons = compare_arms(summary, ["none", "delta", "same"], "none", analysis)
    delta = comparisons["final_accuracy"][0]
    assert delta.family == 2 and delta.paired.sd == pytest.approx(np.std(DIFFS, ddof=1))
    assert delta.mde(ALPHA) == pytest.approx(minimum_detectable_effect(delta.paired.sd, 8, ALPHA, 2))
    rows = pd.DataFrame(_comparison_rows(comparisons, analysis)).set_index(["arm", "metric"])
    row = rows.loc[("delta", "final_accuracy")]
    assert row["mde80"] == pytest.approx(delta.mde(ALPHA)) and row["holm_family"] == 2
    assert row["seeds_for_effect_of_interest"] == seeds_needed(0.05, delta.paired.sd, ALPHA, 2)
    assert row["seeds_for_observed"] == seeds_needed(delta.paired.mean, delta.paired.sd, ALPHA, 2)
    assert math.isnan(rows.loc[("delta", "reward_auc"), "effect_of_interest"])
    lines = _seeds_lines(comparisons, analysis)
    needed = seeds_needed(0.05, delta.paired.sd, ALPHA, 2)
    assert lines[0].startswith(f"held-out accuracy: seeds needed for an effect of +/-0.050 "
                               f"(analysis.effect_of_interest): delta {needed}, same ")
    assert "reward AUC: seeds needed for an effect of the observed size: delta never (+0.0000)" in lines[1]


@pytest.mark.parametrize("effects", [{"accuracy": 0.05}, {"final_accuracy": -0.1}, {"final_accuracy": "big"}, [1]])
def test_a_bad_effect_of_interest_is_one_line_naming_the_fix(effects):
    study = {"name": "s", "arms": {"none": {}, "delta": {}}, "seeds": [0, 1], "baseline": "none",
             "analysis": {"effect_of_interest": effects}}
    with pytest.raises(UserError, match="effect_of_interest maps a metric"):
        parse_study(study, Path("s.yaml"))
    study["analysis"] = {"effect_of_interest": {"final_accuracy": 0.05, "reward_auc": 1}}
    assert parse_study(study, Path("s.yaml")).analysis.effect_of_interest == {"final_accuracy": 0.05,
                                                                               "reward_auc": 1}
