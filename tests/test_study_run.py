"""A tiny study end to end through run_study.py on the tiny random model: 2 arms x 2 seeds x 2 steps,
shared stages 1-2 built once, SIGKILLed in the middle and rerun; and the seeds' pairing of the arms."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE3 = {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 10, "eval_prompts": 1, "num_train_prompts": 16,
          "lr": 1e-2, "rewards": "completion_chars=1", "max_steps": 2, "save_every": 1, "eval_every": 2}


def _launch(study: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "study_launcher.py"), "--study", str(study)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the study ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_and_rerun(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    study = tmp / "tiny.yaml"
    study.write_text(yaml.safe_dump({
        "name": "tiny", "model_name": str(tiny_model_dir), "task_name": "arithmetic", "out_dir": str(tmp / "out"),
        "stage1": {"num_prompts": 4, "group_size": 4, "max_new_tokens": 8, "levels": [0, 1], "prompts_per_chunk": 2,
                   "rewards": "completion_chars=1"},
        "stage2": {"max_epochs": 1, "val_fraction": 0.5, "batch_size": 8, "report_examples": 0},
        "stage3": STAGE3, "arms": {"none": {"softmask": "none"}, "shuffled": {"softmask": "shuffled"}},
        "seeds": [0, 1], "baseline": "none"}, sort_keys=False))
    study_dir = tmp / "out/arithmetic/tiny-llama/studies/tiny"
    runs = study_dir / "runs"
    first = _launch(study)
    # kill it once the first run has finished and the second has saved its first step but not finished
    _wait_until(lambda: (runs / "none/seed-0/metadata.json").exists()
                and (runs / "shuffled/seed-0/checkpoints/step-000001.ckpt").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    interrupted = not (runs / "shuffled/seed-0/metadata.json").exists()
    finished_meta = (runs / "none/seed-0/metadata.json").read_bytes()
    dump_parts = {p: p.stat().st_mtime_ns for p in (tmp / "out").glob("arithmetic/tiny-llama/rollouts_*/*.parquet")}
    export = next((tmp / "out").glob("arithmetic/tiny-llama/importance_net/*/export/trainable.safetensors"))
    export_mtime = export.stat().st_mtime_ns
    second = _launch(study)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]
    return {"study_dir": study_dir, "runs": runs, "interrupted": interrupted, "finished_meta": finished_meta,
            "dump_parts": dump_parts, "export": export, "export_mtime": export_mtime, "out": out, "err": err}


def test_a_killed_study_rerun_finishes_without_redoing_work(killed_and_rerun):
    r = killed_and_rerun
    assert r["interrupted"], "the kill must land while shuffled/seed-0 is between its checkpoints"
    assert "[1/4] none/seed-0: done, skipped" in r["err"]
    assert "[2/4] shuffled/seed-0: resuming from its newest checkpoint" in r["err"]
    assert "[3/4] none/seed-1: starting" in r["err"] and "[4/4] shuffled/seed-1: starting" in r["err"]
    assert "study tiny: stage1" not in r["err"] and "study tiny: stage2" not in r["err"], "built once, reused"
    assert r["dump_parts"] and all(p.stat().st_mtime_ns == t for p, t in r["dump_parts"].items())
    assert r["export"].stat().st_mtime_ns == r["export_mtime"]
    assert (r["runs"] / "none/seed-0/metadata.json").read_bytes() == r["finished_meta"], "not redone"
    for arm in ("none", "shuffled"):
        for seed in (0, 1):
            run = r["runs"] / arm / f"seed-{seed}"
            assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [1, 2], f"{run}: no step twice"
            evals = pd.read_csv(run / "eval.csv")
            assert not evals.duplicated(["step", "level"]).any() and sorted(evals["step"].unique()) == [0, 2]
            assert pd.read_parquet(run / "samples.parquet").groupby("step").size().tolist() == [8, 8]
    assert sorted(p.name for p in r["runs"].glob("*/*")) == ["seed-0", "seed-0", "seed-1", "seed-1"]


def test_the_rerun_writes_the_report(killed_and_rerun):
    study_dir = killed_and_rerun["study_dir"]
    summary = pd.read_csv(study_dir / "summary.csv")
    assert sorted(zip(summary["arm"], summary["seed"], strict=True)) == [("none", 0), ("none", 1), ("shuffled", 0),
                                                                          ("shuffled", 1)]
    metrics = pd.read_csv(study_dir / "runs/shuffled/seed-1/metrics.csv")
    row = summary[(summary["arm"] == "shuffled") & (summary["seed"] == 1)].iloc[0]
    assert row["reward_auc"] == pytest.approx(metrics["reward_mean"].mean())
    assert row["top20_mass"] > 0.2 + 1e-3, "shuffled concentrates weight like delta"
    report = (study_dir / "report.md").read_text()
    assert "shuffled vs none:" in report and "over 2 seeds" in report and "4 of 4 runs finished" in report
    assert "report: " in killed_and_rerun["out"] and "shuffled vs none:" in killed_and_rerun["out"]
    for name in ("report.html", "reward_curves.png", "accuracy_curves.png", "importance_calibration.png"):
        assert (study_dir / name).stat().st_size > 500


def test_a_seed_gives_every_arm_the_same_prompts_and_first_samples(killed_and_rerun):
    """Stage 3 seeds its sampler with --seed and each request with (seed, prompt_id, step, g)."""
    runs = killed_and_rerun["runs"]

    def first_step(arm: str, seed: int) -> pd.DataFrame:
        samples = pd.read_parquet(runs / arm / f"seed-{seed}" / "samples.parquet")
        return samples[samples["step"] == 1][["prompt_id", "completion", "reward"]].reset_index(drop=True)

    for seed in (0, 1):
        pd.testing.assert_frame_equal(first_step("none", seed), first_step("shuffled", seed))
    assert not first_step("none", 0).equals(first_step("none", 1)), "another seed, other samples"
