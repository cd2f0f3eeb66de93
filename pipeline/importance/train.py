"""Stage 2 orchestration: check the inputs, fit, export, plot, report, record what was done.

Every check that can fail on user input runs before anything is written, so a bad call leaves
existing artifacts untouched.
"""

from __future__ import annotations

import csv
import io
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from pipeline.artifacts import (
    check_writable,
    ensure_writable_dir,
    now_iso,
    provenance,
    read_json,
    stage_dir,
    write_json,
)
from pipeline.cli import check_lightning, lightning_devices
from pipeline.credit_truth import compare_export
from pipeline.dump import read_metadata, schema_version, tokenizer_fingerprint
from pipeline.errors import UserError
from pipeline.importance.averaging import TrainableEMA
from pipeline.importance.config import IDENTITY_ARGS, ImportanceArgs
from pipeline.importance.data import PairDataModule, dump_reward_column
from pipeline.importance.export import load, save_export
from pipeline.importance.forms import constant_hazard_curve
from pipeline.importance.loss import (
    LIKELIHOODS,
    best_constant_f,
    minimise_scalar,
    resolve_likelihood,
)
from pipeline.importance.metrics import TABLES, TableWriter
from pipeline.importance.model import FeatureCache, ImportanceModule, NetConfig
from pipeline.importance.plots import plot_calibration, plot_f_by_position
from pipeline.importance.report import Example, write_report
from pipeline.models import ALIASES, load_config, load_tokenizer, model_slug
from pipeline.tasks import task_slug
from pipeline.trackers import make_loggers, parse_report_to

log = logging.getLogger(__name__)

F_ENDS = ("pinned", "learnt")
RUNS_DIR = "importance_net"  # <out_dir>/<task>/<model>/importance_net/<run>
LAST_CKPT = "last.ckpt"


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that appends to the metrics.csv of the run it resumes instead of deleting it."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        previous = path.read_text() if path.is_file() else ""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            experiment = super().experiment
        if previous and self._experiment is not None:  # rank zero: put the earlier epochs back
            path.write_text(previous)
            experiment.metrics_keys = next(csv.reader(io.StringIO(previous)))
        return experiment


def default_run_dir(rollouts: str | Path, run_name: str, out_dir: str | Path | None) -> Path:
    """``<out_dir>/<task>/<model>/importance_net/<run>``, ``--out_dir`` the root of the tree as in stages 1 and 3
    (the dump's task and model, named as they name them); without it the same place beside the dump:
    ``<dump's model dir>/importance_net/<run>``."""
    if out_dir is not None:
        meta = read_metadata(rollouts)
        missing = [key for key in ("task_name", "model_name") if not meta.get(key)]
        if missing:
            raise UserError(f"rollouts '{rollouts}' record no {' or '.join(missing)}, which name the run's place "
                            "under --out_dir: drop --out_dir (the run then goes beside the dump)")
        return stage_dir(out_dir, task_slug(meta["task_name"]), model_slug(meta["model_name"])) / RUNS_DIR / run_name
    path = Path(rollouts).resolve()
    if path.is_file() and path.parent.name.startswith("rollouts_"):  # a part file inside rollouts_<tag>/
        path = path.parent
    return path.parent / RUNS_DIR / run_name


def check_tokenizer(meta: dict[str, Any], fingerprint: dict[str, Any], backbone: str, rollouts: str | Path) -> None:
    """Inputs are stored token ids: they only mean the same text under the rollout model's tokenizer."""
    expected = meta.get("tokenizer")
    if expected is None:
        log.warning("rollouts '%s' record no tokenizer fingerprint: cannot check that backbone '%s' matches",
                    rollouts, backbone)
    elif expected != fingerprint:
        raise UserError(
            f"backbone '{backbone}' has a different tokenizer (vocab {fingerprint['vocab_size']}, "
            f"sha {fingerprint['vocab_sha256']}) than the rollouts '{rollouts}' (model "
            f"'{meta.get('model_name')}', vocab {expected.get('vocab_size')}, sha {expected.get('vocab_sha256')}): "
            f"pass --backbone with the rollout model's tokenizer"
        )


def _backbone_ref(backbone: str) -> str:
    """What the export records: aliases and hub ids as given, local directories as absolute paths."""
    path = Path(backbone).expanduser()
    return backbone if backbone in ALIASES or not path.exists() else str(path.resolve())


def _checkpoints(run_dir: Path) -> list[Path]:
    """What a resume can start from: last.ckpt (every epoch end) and Lightning's SLURM ``hpc_ckpt_*.ckpt``
    (saved on SIGUSR1 before a requeue), newest last."""
    found = [run_dir / "checkpoints" / LAST_CKPT, *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime)


def _check_run_dir(run_dir: Path, resume: bool, identity: dict[str, Any]) -> None:
    """Refuse to overwrite a run, or to resume one that was started with other data or network options."""
    if not resume:
        if _checkpoints(run_dir) or any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "export").exists():
            raise UserError(f"run '{run_dir}' exists: pass --resume to continue it or --run_name for a new run")
        return
    if not _checkpoints(run_dir):  # e.g. a SLURM requeue of a job stopped before its first epoch ended
        log.info("--resume: no checkpoint in '%s' yet, starting the run from the beginning", run_dir)
        return
    meta_path = run_dir / "metadata.json"
    previous = read_json(meta_path, "restore it, or pass a new --run_name").get("arguments", {}) \
        if meta_path.is_file() else {}
    changed = [k for k in IDENTITY_ARGS if k in previous and previous[k] != identity[k]]
    if changed:
        raise UserError(f"--resume: {', '.join(changed)} differ from the run in '{run_dir}': resume with "
                        f"the same values, or pass a new --run_name")


def _check_last_k(backbone: str, backbone_mode: str, last_k: int) -> None:
    """--last_k against the backbone's depth, from its config, before the weights load."""
    layers = getattr(load_config(backbone), "num_hidden_layers", None) if backbone_mode == "last_k" else None
    if layers is not None and not 1 <= last_k <= layers:
        raise UserError(f"--last_k must be in 1..{layers} for this backbone, got {last_k}")


def _report_examples(dm: PairDataModule, n: int) -> list[Example]:
    """Sister A of the first pair of up to ``n`` validation prompts."""
    _, first = np.unique(dm.val.prompt_id, return_index=True)
    return [Example(dm.val.prompt[i].tolist(), dm.val.completion[i].tolist(), float(dm.val.r1[i]))
            for i in sorted(first)[:n]]


def starting_point(form: str, likelihood: str, split: np.ndarray, targets: dict[str, np.ndarray]) -> tuple[float, float]:
    """(baseline f, initial value of the head) fitted on the training pairs (their splits and targets; stage 3's
    online head calls it too).

    The baseline is the best constant for t > 0 (f(0) = 0 is pinned for every model, so pairs at t = 0
    carry no information about it). The direct form starts at it; the monotone form starts at the best
    constant hazard, f(t) = 1 - exp(-rate t).
    """
    moved = split > 0
    targets = {k: torch.as_tensor(v[moved], dtype=torch.float64) for k, v in targets.items()}
    baseline = best_constant_f(likelihood, targets)
    if form == "direct":
        return baseline, baseline
    t = torch.as_tensor(split[moved])
    fn = LIKELIHOODS[likelihood]
    log_rate = minimise_scalar(lambda x: float(fn(constant_hazard_curve(float(np.exp(x)), t), targets).mean()),
                               float(np.log(1e-4)), float(np.log(5.0)))
    return baseline, float(np.exp(log_rate))


def _fit(module: ImportanceModule, dm: PairDataModule, run_dir: Path, resume_from: Path | None, patience: int,
         ema_decay: float, trackers: list[Logger], **trainer_args: Any) -> tuple[L.Trainer, str]:
    """Fit (or continue) the run and keep the best candidate on validation loss: the constant baseline, the
    network at its start, or the best epoch's (its weights' EMA with ``ema_decay``), so the result is never
    worse than the constant on validation. Returns the trainer and the choice."""
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:03d}",
                                 auto_insert_metric_name=False, monitor="val/loss", mode="min", save_top_k=1)
    # Lightning's save_last only refreshes last.ckpt when val/loss improves: a second callback writes it every epoch
    latest = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename=LAST_CKPT.removesuffix(".ckpt"),
                             enable_version_counter=False)
    callbacks = [checkpoint, latest, TableWriter(run_dir), *([TrainableEMA(ema_decay)] if ema_decay else [])]
    if patience > 0:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=patience))
    # use_distributed_sampler=False: the datamodule shards pairs itself (fixed shards, unpadded validation)
    trainer = L.Trainer(logger=[ResumableCSVLogger(run_dir, name="", version=""), *trackers],
                        callbacks=callbacks, enable_progress_bar=True,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        default_root_dir=run_dir, use_distributed_sampler=False, **trainer_args)
    # a separate evaluator, so evaluating the candidates is not logged as one more epoch
    trainer_args.pop("max_epochs")
    evaluator = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                          default_root_dir=run_dir, use_distributed_sampler=False, **trainer_args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen body, on purpose
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resuming
        warnings.filterwarnings("ignore", message=".*exceeds the number of samples.*")  # a rank's small shard
        initial = {k: v.clone() for k, v in module.net.trainable_state_dict().items()}
        evaluator.validate(module, datamodule=dm, verbose=False)
        candidates = {"constant": module.val_summary["baseline_loss"], "initial": module.val_summary["loss"]}
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from)
        if checkpoint.best_model_path and checkpoint.best_model_score is not None:
            candidates[Path(checkpoint.best_model_path).name] = float(checkpoint.best_model_score)
        chosen = min(candidates, key=candidates.get)  # ties: the constant, then the start, then training
        if chosen == "constant":
            module.net.config.constant = module.hparams.baseline_f
        elif chosen == "initial":
            module.net.load_state_dict(initial, strict=False)
        else:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state, strict=False)
        evaluator.validate(module, datamodule=dm, verbose=False)
    return trainer, chosen


def run(args: ImportanceArgs, feature_cache: FeatureCache | None = None) -> dict[str, Any]:
    """Train the importance network on a stage-1 dump; returns the run summary (also in metadata.json).

    ``feature_cache``: a frozen backbone's prefix states shared by several runs in one process (the
    recipe measurements); each run computes its own otherwise.
    """
    started, t0 = now_iso(), time.time()
    rollouts = args.rollouts
    check_lightning(quiet=True, accelerator=args.accelerator, devices=args.devices, precision=args.precision)
    if args.f_end not in F_ENDS:
        raise UserError(f"--f_end must be one of {', '.join(F_ENDS)}, got '{args.f_end}'")
    if args.patience < 0:
        raise UserError(f"--patience must be >= 0 (0: no early stopping), got {args.patience}")
    meta = read_metadata(rollouts)
    version = schema_version(rollouts, meta)
    backbone = args.backbone or meta.get("model_name")
    if not backbone:
        raise UserError(f"rollouts '{rollouts}' record no model_name: pass --backbone")
    check_writable(default_run_dir(rollouts, args.run_name or "run", args.out_dir).parent)
    _check_last_k(backbone, args.backbone_mode, args.last_k)
    tokenizer = load_tokenizer(backbone)
    fingerprint = tokenizer_fingerprint(tokenizer)
    check_tokenizer(meta, fingerprint, backbone, rollouts)
    run_name = args.run_name or f"{args.backbone_mode}-{dump_reward_column(rollouts, args.reward_key)}-{args.group_stats}"
    run_dir = default_run_dir(rollouts, run_name, args.out_dir)
    trackers = make_loggers(args.report_to, run_dir, run_name)
    recorded = {**asdict(args), "rollouts": str(Path(rollouts).resolve()), "backbone": _backbone_ref(backbone),
                "devices": str(args.devices), "run_name": run_name,
                "out_dir": str(args.out_dir) if args.out_dir else None, "report_to": list(parse_report_to(args.report_to))}
    is_rank_zero = rank_zero_only.rank == 0  # under DDP every rank runs this; only rank 0 writes
    if is_rank_zero:
        _check_run_dir(run_dir, args.resume, recorded)
    resume_from = _checkpoints(run_dir)[-1] if args.resume and _checkpoints(run_dir) else None

    L.seed_everything(args.seed, verbose=False)
    dm = PairDataModule(rollouts, args.reward_key, args.group_stats, args.val_fraction,
                        args.per_device_train_batch_size, args.seed)
    dm.setup()
    log.info("rollouts '%s': %s", rollouts, version)  # after loading: bad input stays one line
    if dm.max_token_id() >= len(tokenizer):
        raise UserError(f"rollouts '{rollouts}' hold token id {dm.max_token_id()}, beyond backbone '{backbone}''s "
                        f"vocabulary of {len(tokenizer)}: pass the rollout model as --backbone")
    resolved = resolve_likelihood(args.likelihood, np.concatenate([dm.train.binary, dm.val.binary]), dm.reward_column)

    baseline_f, init_value = starting_point(args.f_form, resolved, dm.train.split, dm.train.targets())
    net_config = NetConfig(backbone=recorded["backbone"], backbone_mode=args.backbone_mode, last_k=args.last_k,
                           lora_r=args.lora_r, lora_alpha=args.lora_alpha, head_hidden=args.head_hidden,
                           form=args.f_form, pin_end=args.f_end == "pinned", features=args.features)
    module = ImportanceModule(net_config.to_dict(), resolved, init_value, baseline_f, lr=args.lr,
                              backbone_lr=args.backbone_lr, weight_decay=args.weight_decay,
                              feature_cache=feature_cache)
    if is_rank_zero and resume_from is None:
        ensure_writable_dir(run_dir)
        for stale in ("metrics.csv", *(f"{name}.csv" for name in TABLES)):  # of a run that died before epoch 1
            (run_dir / stale).unlink(missing_ok=True)
    metadata = {"stage": "train_importance_net", "status": "running", "arguments": recorded, "run_dir": str(run_dir),
                "reward_column": dm.reward_column, "likelihood": resolved, "tokenizer": fingerprint,
                "dump_metadata": meta, "counts": dm.counts, "baseline_f": baseline_f, "initial_value": init_value,
                "started": started, **provenance()}
    if is_rank_zero:
        write_json(run_dir / "metadata.json", metadata)
    trainer, chosen = _fit(module, dm, run_dir, resume_from, args.patience, args.ema_decay, trackers, max_epochs=args.max_epochs,
                           accelerator=args.accelerator, devices=lightning_devices(args.devices),
                           precision=args.precision, gradient_clip_val=args.max_grad_norm or None)
    final = module.val_summary
    if not is_rank_zero:
        return final

    validation = {"likelihood": resolved, "units": final["units"], "gain": final["gain"],
                  "gain_ci95": final["gain_ci95"], "pairs": final["pairs"], "prompts": final["prompts"],
                  "loss": final["loss"], "baseline_loss": final["baseline_loss"], "chosen": chosen}
    export_dir = save_export(module.net, run_dir / "export", tokenizer=fingerprint, reward_key=dm.reward_column,
                             group_stats=args.group_stats, likelihood=resolved, baseline_f=baseline_f,
                             validation=validation)
    plot_calibration(final["calibration"], run_dir / "calibration.png")
    plot_f_by_position(final["f_by_position"], run_dir / "f_by_position.png")
    scorer = load(export_dir)
    if args.report_examples > 0:
        write_report(scorer, tokenizer, _report_examples(dm, args.report_examples), run_dir / "report.html")
    truth = compare_export(scorer, rollouts, np.unique(dm.val.prompt_id))  # the credit task's known f; else None
    metadata.update(truth=truth)
    metadata.update(status="done", finished=now_iso(), runtime_s=round(time.time() - t0, 2),
                    epochs_trained=trainer.current_epoch, chosen=chosen, export=str(export_dir),
                    features_computed_rank0=module.features_computed, validation=validation, final=final)
    write_json(run_dir / "metadata.json", metadata)
    return {"run_dir": str(run_dir), "export": str(export_dir), "chosen": chosen, "truth": truth, **final}
