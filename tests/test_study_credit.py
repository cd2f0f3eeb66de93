"""The shipped credit study (studies/cpu_credit.yaml), shrunk to 2 seeds and a few steps, end to end through
run_study.py: every arm runs, the oracle puts its weight on the decision tokens, the report has its MDEs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_seed_credit_study(credit_tiny_cache, tmp_path):
    study = yaml.safe_load((ROOT / "studies" / "cpu_credit.yaml").read_text())
    study["out_dir"] = str(tmp_path / "out")
    study["seeds"] = [0, 1]
    study["stage1"] |= {"num_prompts": 48, "groups_per_prompt": 2}
    study["stage2"] |= {"max_epochs": 2}
    study["stage3"] |= {"max_steps": 3, "eval_every": 3, "save_every": 3, "eval_prompts": 4}
    path = tmp_path / "credit.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RVG_CACHE": str(credit_tiny_cache)}
    done = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "--study", str(path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]

    study_dir = tmp_path / "out" / "credit" / "credit-tiny" / "studies" / "cpu_credit"
    summary = pd.read_csv(study_dir / "summary.csv")
    assert sorted(summary["arm"].unique()) == sorted(study["arms"]) and len(summary) == 2 * len(study["arms"])
    comparisons = pd.read_csv(study_dir / "comparisons.csv")
    assert set(comparisons["arm"]) == set(study["arms"]) - {"none"}
    assert {"mde80", "seeds_for_observed"} <= set(comparisons.columns)
    # 2 seeds: the exact sign-flip test cannot reach 0.05 / 5, so nothing is detectable
    assert (comparisons["mde80"] == float("inf")).all()
    assert "too small to tell" in (study_dir / "report.md").read_text()

    def share(arm: str) -> pd.DataFrame:
        metrics = pd.read_csv(study_dir / "runs" / arm / "seed-0" / "metrics.csv")
        return metrics[["credit/decision_weight_share", "credit/decision_token_share"]]

    oracle, none = share("oracle"), share("none")
    assert (oracle["credit/decision_weight_share"] > 0.9).all()  # the true f: (nearly) all weight on decisions
    pd.testing.assert_series_equal(none["credit/decision_weight_share"], none["credit/decision_token_share"],
                                   check_names=False, atol=1e-9)  # uniform weights: the decisions' share of tokens
