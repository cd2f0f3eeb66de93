"""The two figures of a run: calibration (predicted f vs mean z1*z2) and f by relative position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to touch

from pipeline.artifacts import atomic_write


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def plot_calibration(rows: list[dict[str, Any]], path: Path) -> Path:
    """Points on the diagonal mean the predicted f matches the correlation the pairs show."""
    rows = [r for r in rows if r["count"]]
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    ax.scatter([r["mean_f"] for r in rows], [r["mean_z1z2"] for r in rows],
               s=[20 + 200 * r["count"] / max(x["count"] for x in rows) for r in rows], label="bins (size: pairs)")
    ax.set(xlabel="mean predicted f in bin", ylabel="mean z1*z2 in bin", title="Calibration (validation)",
           xlim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_f_by_position(rows: list[dict[str, Any]], path: Path) -> Path:
    """How much of the reward variance the network thinks is decided as the completion goes on."""
    rows = [r for r in rows if r["count"]]
    centres = [(r["lo"] + r["hi"]) / 2 for r in rows]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    ax.plot(centres, [r["mean_f"] for r in rows], marker="o", label="mean predicted f")
    ax.plot(centres, [r["mean_z1z2"] for r in rows], marker="x", ls=":", label="mean z1*z2 (empirical)")
    ax.set(xlabel="split position t / completion length", ylabel="f", xlim=(0, 1),
           title="f by relative position (validation)")
    ax.legend(fontsize=8)
    return _save(fig, path)
