"""--report_to: stages 3 and 2 through their CLIs on the tiny model write TensorBoard events and an
offline W&B run holding the numbers of metrics.csv (never a string metric such as the sampler hash);
stage 3 redraws its plots at every evaluation; MLflow's file store; bad names and missing packages."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import rewards
import train_grpo_softmask
import train_importance_net
from pipeline.grpo import train as grpo_train
from pipeline.models import load_tokenizer
from pipeline.trackers import make_loggers, numeric_only, parse_report_to, wandb_logger
from tests.grpo_launcher import completion_chars
from tests.synthetic_dump import write_synthetic_dump

STAGE3 = ["--task_name", "arithmetic", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "10",
          "--eval_prompts", "1", "--num_train_prompts", "16", "--lr", "1e-2", "--rewards", "completion_chars=1",
          "--max_steps", "2", "--save_every", "1", "--eval_every", "1", "--sampler", "gaussian", "--run_name", "r"]


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The records of the offline run's transaction log (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header, after W&B's own 7-byte file header)."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_history(run_dir: Path) -> list[dict]:
    return [_items(r.history.item) for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]


@pytest.fixture(scope="module")
def offline_wandb(tmp_path_factory):
    """No key, no mode: what a compute node without network has. W&B's own folders go to tmp."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
            mp.delenv(var, raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(tmp_path_factory.mktemp(var.lower())))
        yield mp


@pytest.fixture(scope="module")
def stage3_run(tiny_model_dir, tmp_path_factory, offline_wandb):
    """Stage 3 with --report_to tensorboard,wandb and an evaluation every step; records every plot refresh."""
    out = tmp_path_factory.mktemp("grpo")
    run = out / "arithmetic" / "tiny-llama" / "grpo" / "r"
    refreshes = []
    real_refresh = grpo_train.refresh_plots

    def refresh(metrics, evals, run_dir):
        real_refresh(metrics, evals, run_dir)
        pngs = all((run_dir / name).stat().st_size > 1000 for name in ("learning_curve.png", "curriculum.png"))
        refreshes.append((list(metrics.get("step", [])), sorted(set(evals["step"])), pngs))

    offline_wandb.setitem(rewards.REWARDS, "completion_chars", completion_chars)
    offline_wandb.setattr(grpo_train, "refresh_plots", refresh)
    result = CliRunner().invoke(train_grpo_softmask.main, ["--model_name", str(tiny_model_dir), *STAGE3,
                                                           "--out_dir", str(out), "--report_to", "tensorboard,wandb"],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    return run, refreshes


def test_stage3_tensorboard_holds_every_numeric_metric_and_no_string(stage3_run):
    run, _ = stage3_run
    metrics, evals = pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "eval.csv")
    scalars = tensorboard_scalars(run / "tensorboard")
    assert metrics["sampler_sha"].map(lambda s: isinstance(s, str)).all()
    numeric = [c for c in metrics.columns if c != "sampler_sha"]
    assert set(numeric) <= set(scalars) and "sampler_sha" not in scalars
    assert len(numeric) > 20
    for column in numeric:
        expected = dict(zip(metrics["step"], metrics[column].astype(float), strict=True))
        assert scalars[column] == pytest.approx(expected, rel=1e-6, nan_ok=True), column
    for level, rows in evals.groupby("level"):
        assert scalars[f"eval/accuracy/level_{level}"] == pytest.approx(
            dict(zip(rows["step"], rows["accuracy"], strict=True)))
    assert sorted(scalars["eval/accuracy/level_0"]) == [0, 1, 2]


def test_stage3_offline_wandb_run_holds_the_metrics(stage3_run):
    run, _ = stage3_run
    metrics = pd.read_csv(run / "metrics.csv")
    history = wandb_history(run)
    train_rows = {row["trainer/global_step"]: row for row in history if "reward_mean" in row}
    assert sorted(train_rows) == [1, 2]
    for row in metrics.to_dict("records"):
        logged = train_rows[row["step"]]
        assert "sampler_sha" not in logged
        for key in ("reward_mean", "loss", "grad_norm", "weights/mean", "sampler/level_0"):
            assert logged[key] == pytest.approx(row[key], rel=1e-12), key
    assert any("eval/accuracy/level_4" in row for row in history)
    configs = [_items(r.config.update) for r in wandb_records(run) if r.WhichOneof("record_type") == "config"]
    assert any(config.get("softmask") == "none" for config in configs)


def test_stage3_plots_are_redrawn_at_every_evaluation(stage3_run):
    _, refreshes = stage3_run
    # step-0 evaluation, after steps 1 and 2, and once more at the end of the run
    assert [(m, e) for m, e, _ in refreshes] == [([], [0]), ([1], [0, 1]), ([1, 2], [0, 1, 2]), ([1, 2], [0, 1, 2])]
    assert all(pngs for _, _, pngs in refreshes)


def test_stage2_tensorboard_and_wandb_hold_the_epoch_metrics(tiny_model_dir, tmp_path, offline_wandb):
    dump = tmp_path / "synthetic" / "tiny" / "rollouts_t" / "part-00000.parquet"
    write_synthetic_dump(dump, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir), n_prompts=12,
                         groups_per_prompt=1)  # fmt: skip
    result = CliRunner().invoke(train_importance_net.main, [
        "--rollouts", str(dump.parent), "--max_epochs", "2", "--val_fraction", "0.25", "--report_examples", "0",
        "--run_name", "r", "--report_to", "tensorboard,wandb"], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    run = dump.parents[1] / "importance_net" / "r"
    csv = pd.read_csv(run / "metrics.csv")
    val = csv.dropna(subset=["val/loss"])
    assert len(val) == 2
    scalars = tensorboard_scalars(run / "tensorboard")
    assert sorted(scalars["val/loss"].values()) == pytest.approx(sorted(val["val/loss"]), rel=1e-6)
    assert sorted(scalars["train/loss"].values()) == pytest.approx(sorted(csv["train/loss"].dropna()), rel=1e-6)
    logged = [row["val/loss"] for row in wandb_history(run) if "val/loss" in row]
    assert sorted(logged) == pytest.approx(sorted(val["val/loss"]), rel=1e-6)
    assert json.loads((run / "metadata.json").read_text())["arguments"]["report_to"] == ["tensorboard", "wandb"]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_file_store_keeps_a_metric_and_its_per_level_children(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (logger,) = make_loggers(["mlflow"], tmp_path / "run", "r")
    logger.log_hyperparams({"lr": 0.5, "sampler_params": {"sigma": 0.5}})
    for step in (1, 2):
        logger.log_metrics({"reward_mean": 0.25 * step, "reward_mean/level_0": 0.5 * step}, step=step)
    logger.finalize("success")
    (metrics_dir,) = (tmp_path / "run" / "mlruns").glob("*/*/metrics")
    lines = (metrics_dir / "reward_mean.level_0").read_text().split("\n")
    assert [line.split()[1:] for line in lines if line] == [["0.5", "1"], ["1.0", "2"]]
    assert (metrics_dir / "reward_mean").read_text().split()[1] == "0.25"
    assert (metrics_dir.parent / "params" / "sampler_params" / "sigma").read_text() == "0.5"


def test_wandb_is_offline_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    mode = lambda: wandb_logger(tmp_path, "r")._wandb_init["mode"]  # noqa: E731
    assert mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert mode() == "disabled"
    assert wandb_logger(tmp_path, "r")._wandb_init["id"] == wandb_logger(tmp_path / ".", "other")._wandb_init["id"]


def test_numeric_only_drops_strings_and_unwraps_scalars():
    metrics = {"loss": torch.tensor(0.5), "reward": np.float32(0.25), "count": 3, "nan": float("nan"),
               "sampler_sha": "abc123", "missing": None, "vector": torch.ones(2)}  # fmt: skip
    out = numeric_only(metrics)
    assert set(out) == {"loss", "reward", "count", "nan"}
    assert out["loss"] == 0.5 and out["reward"] == 0.25 and out["count"] == 3.0 and np.isnan(out["nan"])


def test_report_to_parsing():
    assert parse_report_to("tensorboard, WandB,tensorboard") == ("tensorboard", "wandb")
    assert parse_report_to(["none"]) == ("none",) and parse_report_to("") == ("csv",)
    assert make_loggers(("csv",), Path("unused"), "r") == [] and make_loggers(("none",), Path("unused"), "r") == []


@pytest.mark.parametrize("main, value, message", [
    (train_grpo_softmask.main, "tensorbored", "unknown --report_to tensorbored: choose from csv, tensorboard"),
    (train_importance_net.main, "none,wandb", "--report_to none cannot be combined"),
])
def test_bad_report_to_is_one_line_exit_2(main, value, message, tiny_model_dir, tmp_path):
    args = ["--model_name", str(tiny_model_dir), "--out_dir", str(tmp_path)] if main is train_grpo_softmask.main \
        else ["--rollouts", str(tmp_path / "dump")]
    result = CliRunner().invoke(main, [*args, "--report_to", value])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_missing_tracker_package_fails_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = CliRunner().invoke(train_grpo_softmask.main, ["--model_name", str(tiny_model_dir), *STAGE3,
                                                           "--out_dir", str(tmp_path / "out"), "--report_to", "mlflow"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --report_to needs mlflow: pip install mlflow"
    assert not (tmp_path / "out").exists()
