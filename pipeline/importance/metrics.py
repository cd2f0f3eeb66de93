"""Validation metrics: the loss against the best constant f (with a bootstrap CI over prompts),
calibration, and f by position in the completion.

Everything is accumulated as sums (count, sum f, sum z1*z2 per bin; pairs and losses per prompt), so
devices can add theirs before the means are taken. Under a correct model E[z1 z2 | f] = f: the
calibration table compares the two bin by bin.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from pipeline.importance.data import TARGETS
from pipeline.importance.loss import UNITS, validation_loss

N_BINS = 10
TABLES = ("calibration", "f_by_position")  # binned by predicted f; by t / len(completion)


def _bins(x: Tensor) -> Tensor:
    return (x * N_BINS).long().clamp(0, N_BINS - 1)


def bootstrap_gain_ci(by_prompt: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the gain (baseline - model, per pair) resampling validation *prompts*.

    ``by_prompt`` rows: (pairs, sum of the model's loss, sum of the baseline's loss) per prompt. Prompts,
    not pairs, are the independent units: pairs of one prompt share m_q, v_q and often their text.
    """
    rows = by_prompt[by_prompt[:, 0] > 0]
    if len(rows) == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(rows), size=(n_boot, len(rows)))
    totals = rows[draws].sum(1)  # (n_boot, 3)
    gains = (totals[:, 2] - totals[:, 1]) / totals[:, 0]
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return float(lo), float(hi)


class ValidationStats:
    """Sums over validation pairs; ``reduce`` adds those of other devices before ``summary``.

    The baseline is the best constant with the same pinned start: f(0) = 0, f(t) = baseline_f for t > 0.
    Both are scored by the robust ``validation_loss``, so one prompt's confidently wrong pairs cannot decide.
    """

    def __init__(self, likelihood: str, baseline_f: float, n_prompts: int, device: torch.device | str = "cpu") -> None:
        self.likelihood, self.baseline_f = likelihood, baseline_f
        self.loss_fn = validation_loss(likelihood)
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # pairs, sum loss, sum baseline loss
        self.by_prompt = torch.zeros(max(n_prompts, 1), 3, dtype=torch.float64, device=device)
        self.tables = {name: torch.zeros(N_BINS, 3, dtype=torch.float64, device=device) for name in TABLES}

    def update(self, f: Tensor, batch: dict[str, Tensor]) -> None:
        targets = {k: batch[k].double() for k in TARGETS}
        f = f.detach().double()
        baseline = torch.where(batch["split"] > 0, self.baseline_f, 0.0).double()
        losses = torch.stack([torch.ones_like(f), self.loss_fn(f, targets), self.loss_fn(baseline, targets)], dim=1)
        self.totals += losses.sum(0)
        self.by_prompt.index_add_(0, batch["prompt_index"], losses)
        values = torch.stack([torch.ones_like(f), f, targets["z1"] * targets["z2"]], dim=1)
        self.tables["calibration"].index_add_(0, _bins(f), values)
        self.tables["f_by_position"].index_add_(0, _bins(batch["relative"].double()), values)

    def reduce(self, add: Callable[[Tensor], Tensor]) -> None:
        self.totals = add(self.totals)
        self.by_prompt = add(self.by_prompt)
        self.tables = {name: add(table) for name, table in self.tables.items()}

    def summary(self) -> dict[str, Any]:
        """Scalars, the gain's bootstrap CI, and the two tables as rows {lo, hi, count, mean_f, mean_z1z2}."""
        n, loss, baseline = (float(x) for x in self.totals)
        n = max(n, 1.0)
        by_prompt = self.by_prompt.cpu().numpy()
        out: dict[str, Any] = {"likelihood": self.likelihood, "units": UNITS[self.likelihood], "pairs": int(n),
                               "prompts": int((by_prompt[:, 0] > 0).sum()), "loss": loss / n,
                               "baseline_f": self.baseline_f, "baseline_loss": baseline / n,
                               "gain": (baseline - loss) / n, "gain_ci95": list(bootstrap_gain_ci(by_prompt))}
        for name, table in self.tables.items():
            count = table[:, 0]
            means = (table[:, 1:] / count.clamp(min=1).unsqueeze(1)).tolist()
            out[name] = [{"lo": i / N_BINS, "hi": (i + 1) / N_BINS, "count": int(count[i]),
                          "mean_f": means[i][0] if count[i] else None,
                          "mean_z1z2": means[i][1] if count[i] else None} for i in range(N_BINS)]
        calib = self.tables["calibration"]
        gap = (calib[:, 1] - calib[:, 2]).abs().sum()  # sum over bins of count * |mean f - mean z1 z2|
        out["calibration_error"] = float(gap) / n
        return out


class TableWriter(L.Callback):
    """Appends each epoch's calibration and f-by-position tables to ``<run>/<table>.csv``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        for name in TABLES:
            path = self.run_dir / f"{name}.csv"
            new = not path.exists()
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["epoch", "lo", "hi", "count", "mean_f", "mean_z1z2"])
                if new:
                    writer.writeheader()
                writer.writerows({"epoch": trainer.current_epoch, **row} for row in pl_module.val_summary[name])
