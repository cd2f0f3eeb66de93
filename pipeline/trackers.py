"""Experiment trackers for stages 2 and 3 (``--report_to``): Lightning loggers by name.

``csv`` is the run's own ``metrics.csv``, always written (stage 3's RunTable, stage 2's CSVLogger),
so it adds no logger here; ``none`` means no tracker. W&B runs offline unless the user sets
``WANDB_MODE`` (or ``WANDB_API_KEY``): compute nodes often have no network, and
``wandb sync <run_dir>/wandb/offline-run-*`` uploads afterwards. MLflow logs to
``MLFLOW_TRACKING_URI`` when set, else to a file store in the run directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    from lightning.fabric.loggers import Logger

TRACKERS = ("csv", "tensorboard", "wandb", "mlflow", "none")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "reward-variance-grpo"


def parse_report_to(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` or a list -> ("tensorboard", "wandb"); unknown names are a UserError."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"unknown --report_to {', '.join(unknown)}: choose from {', '.join(TRACKERS)} "
                        "(several comma-separated)")
    if "none" in names and len(names) > 1:
        raise UserError("--report_to none cannot be combined with other trackers")
    return names or ("csv",)


def check_installed(report_to: Iterable[str]) -> None:
    """Fail before the run starts, with the install line, when a tracker's package is missing."""
    missing = [PACKAGE[n] for n in report_to if n in PACKAGE and importlib.util.find_spec(PACKAGE[n]) is None]
    if missing:
        raise UserError(f"--report_to needs {', '.join(missing)}: pip install {' '.join(missing)}")


def wandb_logger(run_dir: Path, run_name: str) -> Logger:
    """Offline unless the user chose a mode or gave a key; one W&B id per run directory, so a
    resumed run continues the same W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    class FinishingWandbLogger(WandbLogger):
        """``finalize`` also finishes the W&B run: Lightning leaves it open until the process exits,
        and a second run in the same process would log into it."""

        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None:
                self._experiment.finish(exit_code=0 if status == "success" else 1)
                self._experiment = None

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return FinishingWandbLogger(name=run_name, save_dir=str(run_dir), id=run_id, mode=mode,
                                project=os.environ.get("WANDB_PROJECT", PROJECT))


def mlflow_logger(run_dir: Path, run_name: str) -> Logger:
    """To ``MLFLOW_TRACKING_URI``, else to a file store in the run directory. A file store keeps each
    metric in a file named after it, so ``reward_mean`` and ``reward_mean/level_0`` cannot both
    exist there: for file stores '/' in metric names becomes '.'."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.utils.uri import is_local_uri

    class FileSafeMLFlowLogger(MLFlowLogger):
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics({key.replace("/", "."): value for key, value in metrics.items()}, step)

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:  # MLflow 3 refuses a file store unless asked; the run dir is the one place we own
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (run_dir / "mlruns").resolve().as_uri()
    return (FileSafeMLFlowLogger if is_local_uri(uri) else MLFlowLogger)(
        experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run_name, tracking_uri=uri)


def make_loggers(report_to: Iterable[str], run_dir: Path, run_name: str) -> list[Logger]:
    """The trackers of ``report_to``, writing under ``run_dir`` (W&B, TensorBoard, an MLflow file store).

    They are lazy: nothing is written before the first ``log_metrics``/``log_hyperparams``, so a
    run can build them before it has checked its inputs; and they log on rank zero only.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    report_to = parse_report_to(report_to)
    check_installed(report_to)
    loggers: list[Logger] = []
    if "tensorboard" in report_to:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
    if "wandb" in report_to:
        loggers.append(wandb_logger(run_dir, run_name))
    if "mlflow" in report_to:
        loggers.append(mlflow_logger(run_dir, run_name))
    return loggers


def numeric_only(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: real numbers (NaN included), never strings such as a hash."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, numbers.Real):
            out[key] = float(value)
    return out
