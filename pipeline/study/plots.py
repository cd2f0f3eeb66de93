"""The study's figures: per-arm curves with 95% bootstrap bands over seeds, and paired differences."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.study.statistics import PairedComparison, bootstrap_band  # noqa: E402

Curves = tuple[np.ndarray, np.ndarray]  # (x, (seeds, x) values)


def _band(ax, x: np.ndarray, curves: np.ndarray, label: str, color) -> None:
    ax.plot(x, curves.mean(axis=0), color=color, label=f"{label} (n={len(curves)})", marker="." if len(x) < 30 else None)
    if len(curves) > 1:
        lo, hi = bootstrap_band(curves)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_reward_curves(by_arm: dict[str, Curves], colors: dict[str, str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, (x, curves) in by_arm.items():
        _band(ax, x, curves, arm, colors[arm])
    ax.set(title="training reward: mean over seeds, 95% bootstrap band", xlabel="step", ylabel="mean reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy_curves(by_arm: dict[str, dict[str, Curves]], colors: dict[str, str], path: Path) -> Path:
    panels = list(next(iter(by_arm.values())))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for arm, curves in by_arm.items():
            _band(ax, *curves[panel], arm, colors[arm])
        ax.set(title=panel, xlabel="step", ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_paired_differences(comparisons: dict[str, PairedComparison], label: str, baseline: str,
                            colors: dict[str, str], path: Path) -> Path:
    """Per arm: each seed's difference to the baseline (dots), their mean and 95% bootstrap CI (bar)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(comparisons), 3.6))
    for i, (arm, c) in enumerate(comparisons.items()):
        ax.scatter(np.full(c.n, i) + np.linspace(-0.12, 0.12, c.n), c.differences, color="grey", s=14, zorder=2)
        ax.errorbar(i, c.mean, yerr=[[c.mean - c.ci_low], [c.ci_high - c.mean]], fmt="o", color=colors[arm],
                    capsize=6, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(comparisons)), list(comparisons))
    ax.set(title=f"{label}: arm - {baseline} per seed", ylabel="difference")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
