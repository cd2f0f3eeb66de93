"""Validation metrics: NLL against the best constant f, calibration, and f by position in the completion.

Everything is accumulated as sums (count, sum f, sum z1*z2 per bin), so devices can add theirs
before the means are taken. Under a correct model E[z1 z2 | f] = f: the calibration table
compares the two bin by bin.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from pipeline.importance.loss import pair_nll

N_BINS = 10
TABLES = ("calibration", "f_by_position")  # binned by predicted f; by t / len(completion)


def _bins(x: Tensor) -> Tensor:
    return (x * N_BINS).long().clamp(0, N_BINS - 1)


class ValidationStats:
    """Sums over validation pairs; ``reduce`` adds those of other devices before ``summary``."""

    def __init__(self, baseline_f: float, device: torch.device | str = "cpu") -> None:
        self.baseline_f = baseline_f
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # pairs, sum NLL, sum baseline NLL
        self.tables = {name: torch.zeros(N_BINS, 3, dtype=torch.float64, device=device) for name in TABLES}

    def update(self, f: Tensor, z1: Tensor, z2: Tensor, relative: Tensor) -> None:
        f, z1, z2 = f.detach().double(), z1.double(), z2.double()
        nll = pair_nll(f, z1, z2)
        baseline = pair_nll(torch.full_like(f, self.baseline_f), z1, z2)
        self.totals += torch.stack([torch.tensor(len(f), dtype=torch.float64, device=f.device),
                                    nll.sum(), baseline.sum()])
        values = torch.stack([torch.ones_like(f), f, z1 * z2], dim=1)
        self.tables["calibration"].index_add_(0, _bins(f), values)
        self.tables["f_by_position"].index_add_(0, _bins(relative.double()), values)

    def reduce(self, add: Callable[[Tensor], Tensor]) -> None:
        self.totals = add(self.totals)
        self.tables = {name: add(table) for name, table in self.tables.items()}

    def summary(self) -> dict[str, Any]:
        """Scalars plus the two tables as rows {lo, hi, count, mean_f, mean_z1z2} (means None in empty bins)."""
        n, nll, baseline = (float(x) for x in self.totals)
        n = max(n, 1.0)
        out: dict[str, Any] = {"pairs": int(n), "nll": nll / n, "baseline_f": self.baseline_f,
                               "baseline_nll": baseline / n, "gain": (baseline - nll) / n}
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
