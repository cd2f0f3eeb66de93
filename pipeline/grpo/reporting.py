"""Run outputs that survive a resume: metrics/eval CSVs and samples truncated to the checkpoint step,
and the plots, redrawn at every evaluation so a running or preempted run has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.artifacts import atomic_write  # noqa: E402


class RunTable:
    """Rows keyed by ``step``, rewritten atomically; on resume rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
            self.rows = frame[frame["step"] <= resume_step].to_dict("records")

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def flush(self) -> None:
        frame = pd.DataFrame(self.rows)
        if self.path.suffix == ".parquet":
            atomic_write(self.path, lambda tmp: frame.to_parquet(tmp, index=False))
        else:
            atomic_write(self.path, lambda tmp: frame.to_csv(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def window_mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics row for the steps since the last (``--logging_steps``, as TRL logs): numbers averaged,
    ``step`` and anything else from the last step."""
    row = dict(rows[-1])
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rows if key in r]
            row[key] = sum(values) / len(values)
    return row


def refresh_plots(metrics: pd.DataFrame, evals: pd.DataFrame, run_dir: Path) -> None:
    """learning_curve.png and curriculum.png of the run so far, each replaced atomically."""
    plot_learning_curve(metrics, evals, run_dir / "learning_curve.png")
    plot_curriculum(metrics, run_dir / "curriculum.png")


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_learning_curve(metrics: pd.DataFrame, evals: pd.DataFrame, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if not metrics.empty:
        for column in sorted(c for c in metrics.columns if c.startswith("reward_mean/level_")):
            series = metrics[["step", column]].dropna()
            left.plot(series["step"], series[column], marker=".", label=column.split("/")[-1])
        left.plot(metrics["step"], metrics["reward_mean"], color="black", label="all")
        left.legend(fontsize=8)
    left.set(title="training reward", xlabel="step", ylabel="mean reward")
    if not evals.empty:
        for level, rows in evals.groupby("level"):
            right.plot(rows["step"], rows["accuracy"], marker="o", label=f"level_{level}")
        right.legend(fontsize=8)
    right.set(title="greedy eval accuracy (held-out prompts)", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    fig.tight_layout()
    _save(fig, path)


def plot_curriculum(metrics: pd.DataFrame, path: Path) -> None:
    columns = sorted(c for c in metrics.columns if c.startswith("sampler/"))
    fig, ax = plt.subplots(figsize=(6, 4))
    if columns:
        ax.stackplot(metrics["step"], *[metrics[c].fillna(0) for c in columns],
                     labels=[c.split("/", 1)[1] for c in columns])
        ax.legend(fontsize=8, loc="upper left")
    ax.set(title="sampler probabilities", xlabel="step", ylabel="probability", ylim=(0, 1))
    fig.tight_layout()
    _save(fig, path)
