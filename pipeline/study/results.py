"""What each finished run measured, read from its stage-3 files (metrics.csv, eval.csv, metadata.json).

Per run: final held-out accuracy (greedy, at the last evaluation; mean over the evaluated levels
and per level), the area under the training-reward curve (the mean of ``reward_mean`` over all
steps: reward per step, the sample-efficiency measure), the final reward (mean of the last
``reward_window`` steps), the steps to reach a reward threshold (first step whose moving average
over ``reward_window`` steps reaches it; a run that never does counts as max_steps + 1), and the
weight concentration (mean ``weights/top20_mass``: 0.2 for uniform weights, near 1 when a few
tokens carry all the credit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.study.config import Analysis
from pipeline.study.grid import RunSpec

PRIMARY = "final_accuracy"


@dataclass(frozen=True)
class RunResult:
    run: RunSpec
    metrics: pd.DataFrame  # one row per step
    evals: pd.DataFrame  # one row per (step, level)
    metadata: dict[str, Any]


def load_run(run: RunSpec) -> RunResult:
    return RunResult(run, pd.read_csv(run.run_dir / "metrics.csv"), pd.read_csv(run.run_dir / "eval.csv"),
                     json.loads((run.run_dir / "metadata.json").read_text()))


def final_accuracy(evals: pd.DataFrame) -> dict[str, float]:
    last = evals[evals["step"] == evals["step"].max()]
    return {"final_accuracy": float(last["accuracy"].mean()),
            **{f"accuracy/level_{int(r.level)}": float(r.accuracy) for r in last.itertuples()}}


def steps_to_threshold(rewards: pd.Series, steps: pd.Series, threshold: float, window: int) -> float:
    smoothed = rewards.rolling(window, min_periods=1).mean().to_numpy()
    reached = np.flatnonzero(smoothed >= threshold)
    return float(steps.iloc[reached[0]]) if reached.size else float(steps.max() + 1)


def final_reward(result: RunResult, window: int) -> float:
    return float(result.metrics["reward_mean"].tail(window).mean())


def reward_threshold(results: list[RunResult], baseline: str, analysis: Analysis) -> float:
    """The file's ``reward_threshold``, else the baseline arm's mean final reward."""
    if analysis.reward_threshold is not None:
        return float(analysis.reward_threshold)
    finals = [final_reward(r, analysis.reward_window) for r in results if r.run.arm == baseline]
    return float(np.mean(finals)) if finals else float("nan")


def summarize(result: RunResult, threshold: float, analysis: Analysis) -> dict[str, Any]:
    """One summary.csv row."""
    m = result.metrics
    concentration = m["weights/top20_mass"].mean() if "weights/top20_mass" in m else float("nan")
    return {"arm": result.run.arm, "seed": result.run.seed, "steps": int(m["step"].max()),
            **final_accuracy(result.evals),
            "reward_auc": float(m["reward_mean"].mean()),
            "final_reward": final_reward(result, analysis.reward_window),
            "steps_to_threshold": steps_to_threshold(m["reward_mean"], m["step"], threshold, analysis.reward_window),
            "top20_mass": float(concentration),
            "runtime_s": float(m["step_time_s"].sum()) if "step_time_s" in m else float("nan"),
            "run_dir": str(result.run.run_dir)}


def reward_curves(results: list[RunResult]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, (runs, steps) training reward) on the steps every run logged."""
    steps = sorted(set.intersection(*(set(r.metrics["step"]) for r in results)))
    curves = np.array([r.metrics.set_index("step").loc[steps, "reward_mean"].to_numpy() for r in results])
    return np.array(steps), curves


def accuracy_curves(results: list[RunResult]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per level (and "mean" over levels): (eval steps, (runs, eval steps) held-out accuracy)."""
    tables = [r.evals.pivot_table(index="step", columns="level", values="accuracy") for r in results]
    steps = sorted(set.intersection(*(set(t.index) for t in tables)))
    levels = sorted(set.intersection(*(set(t.columns) for t in tables)))
    out = {f"level {level}": (np.array(steps), np.array([t.loc[steps, level].to_numpy() for t in tables]))
           for level in levels}
    out["mean over levels"] = (np.array(steps), np.array([t.loc[steps, levels].mean(axis=1).to_numpy()
                                                          for t in tables]))
    return out
