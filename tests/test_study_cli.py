"""run_study.py: the study file's checks, the directory guard, and --aggregate on planted run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipeline.importance.config import ImportanceArgs
from pipeline.stage1 import Stage1Args
from pipeline.study.config import load_study
from pipeline.study.execution import prepare
from pipeline.study.grid import build_plan
from pipeline.study.stages import command
from run_study import main

SEEDS = list(range(8))


def _study(tmp_path: Path, model_dir: Path, **changes) -> Path:
    data = {"name": "planted", "model_name": str(model_dir), "task_name": "arithmetic", "out_dir": str(tmp_path / "out"),
            "stage3": {"max_steps": 10, "group_size": 4}, "seeds": SEEDS, "baseline": "none",
            "arms": {"none": {"softmask": "none"}, "delta": {"softmask": "delta"}, "same": {"softmask": "none"}}}
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("changes, message", [
    ({"baseline": "plain"}, "'baseline' must name one of the arms (none, delta, same)"),
    ({"seeds": [0, 0]}, "'seeds' must be a non-empty list of distinct integers"),
    ({"seeds": 3}, "'seeds' must be a non-empty list"),
    ({"bogus": 1}, "unknown key(s) bogus"),
    ({"name": "a/b"}, "'name' must be letters"),
    ({"arms": {"none": {"softmax": "none"}}}, "arm 'none': unknown option(s) softmax for train_grpo_softmask.py"),
    ({"arms": {"none": {"lr": "fast"}}}, "arm 'none': Invalid value for '--lr'"),
    ({"arms": {"none": {"softmask": "nope"}}}, "arm 'none': Invalid value for '--softmask'"),
    ({"arms": {"none": {}, "x y": {}}}, "arm name 'x y'"),
    ({"stage3": {"seed": 3}}, "stage3: seed set by the study itself"),
    ({"stage1": {"num_promts": 3}}, "stage1: unknown option(s) num_promts for generate_paired_rollouts.py"),
    ({"stage2": {"export": "/no/such/export"}}, "stage2.export '/no/such/export' not found"),
    ({"arms": {"none": {"group_size": 1}}}, "arm 'none': Invalid value for '--group_size': 1 is not in the range x>=2"),
    ({"analysis": {"alpha": 2}}, "analysis: need reward_window >= 1, 0 < alpha < 1"),
    ({"slurm": {"sbatch": {"stage4": "--time=1"}}}, "slurm.sbatch keys are"),
])
def test_a_bad_study_file_is_one_line_and_exit_2(changes, message, tiny_model_dir, tmp_path):
    line = _one_error_line(_invoke("--study", str(_study(tmp_path, tiny_model_dir, **changes)), "--aggregate"))
    assert message in line, line
    assert not (tmp_path / "out").exists(), "nothing is written before the whole study checks out"


def test_a_missing_or_broken_study_file(tmp_path):
    assert "cannot read study file" in _one_error_line(_invoke("--study", str(tmp_path / "nope.yaml")))
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in _one_error_line(_invoke("--study", str(tmp_path / "bad.yaml")))


def test_a_study_directory_made_from_another_file_is_refused(tiny_model_dir, tmp_path):
    prepare(build_plan(load_study(_study(tmp_path, tiny_model_dir, arms={"none": {}}))))
    changed = _study(tmp_path, tiny_model_dir, arms={"none": {}}, stage3={"max_steps": 11, "group_size": 4})
    for mode in ("--local", "--aggregate"):
        line = _one_error_line(_invoke("--study", str(changed), mode))
        assert "made from another study file (differs in: stage3)" in line
    runs = tmp_path / "out/arithmetic/tiny-llama/studies/planted/runs"
    assert not runs.exists()


def test_a_study_grows_by_arms_and_seeds(tiny_model_dir, tmp_path):
    """Adding an arm or a seed keeps the study (its finished runs stay valid); changing an arm does not."""
    prepare(build_plan(load_study(_study(tmp_path, tiny_model_dir, arms={"none": {}}, seeds=[0]))))
    study_json = tmp_path / "out/arithmetic/tiny-llama/studies/planted/study.json"
    created = json.loads(study_json.read_text())["created"]
    grown = load_study(_study(tmp_path, tiny_model_dir, arms={"none": {}, "delta": {"softmask": "delta"}},
                              seeds=[0, 1]))
    prepare(build_plan(grown))
    recorded = json.loads(study_json.read_text())
    assert recorded["study"]["arms"] == {"none": {}, "delta": {"softmask": "delta"}}
    assert recorded["study"]["seeds"] == [0, 1] and recorded["created"] == created and "grown" in recorded
    changed = _study(tmp_path, tiny_model_dir, arms={"none": {"softmask": "delta"}}, seeds=[0, 1])
    assert "(differs in: arms)" in _one_error_line(_invoke("--study", str(changed), "--aggregate"))
    fewer = _study(tmp_path, tiny_model_dir, arms={"none": {}, "delta": {"softmask": "delta"}}, seeds=[1])
    assert "(differs in: seeds)" in _one_error_line(_invoke("--study", str(fewer), "--aggregate"))


def test_the_shared_stages_are_named_by_every_value_they_run_with(tiny_model_dir, tmp_path, monkeypatch):
    """A default spelt out names the same dump and net; another value, or a default that changed since the study
    last ran (here stage 2's --lr), names a new one, so a study never resumes a net made with the old default."""
    def names(**changes) -> tuple[str, str]:
        plan = build_plan(load_study(_study(tmp_path, tiny_model_dir, **changes)))
        return plan.stage1.output.name, plan.stage2.output.name

    default = names()
    assert names(stage1={"temperature": Stage1Args.temperature}, stage2={"lr": ImportanceArgs.lr}) == default
    assert names(stage1={"temperature": 0.7})[0] != default[0]
    other_lr = names(stage2={"lr": 3 * ImportanceArgs.lr})
    assert other_lr[0] == default[0] and other_lr[1] != default[1]
    lr = next(param for param in command("stage2").params if param.name == "lr")
    monkeypatch.setattr(lr, "default", 2 * ImportanceArgs.lr)
    changed_default = names()
    assert changed_default[0] == default[0] and changed_default[1] not in (default[1], other_lr[1])


def _fake_export(tmp_path: Path, gain: float) -> Path:
    export = tmp_path / "imp" / "run" / "export"
    export.mkdir(parents=True)
    validation = {"likelihood": -2.0, "gain": gain, "gain_ci95": [gain - 0.004, gain + 0.002], "pairs": 95,
                  "prompts": 16}
    (export / "importance_net.json").write_text(json.dumps({"format": 1, "validation": validation}))
    (export.parent / "calibration.png").write_bytes(b"png calibration")
    return export


def _write_run(run_dir: Path, accuracy: float, rewards: np.ndarray, top20: float, finished: bool = True) -> None:
    run_dir.mkdir(parents=True)
    steps = np.arange(1, len(rewards) + 1)
    pd.DataFrame({"step": steps, "reward_mean": rewards, "weights/top20_mass": top20,
                  "step_time_s": 2.0}).to_csv(run_dir / "metrics.csv", index=False)
    levels = [0, 1, 4]
    pd.DataFrame({"step": [0] * 3 + [len(rewards)] * 3, "level": levels * 2,
                  "accuracy": [0.0] * 3 + [accuracy - 0.1, accuracy, accuracy + 0.1]}).to_csv(run_dir / "eval.csv",
                                                                                             index=False)
    if finished:
        (run_dir / "metadata.json").write_text("{}")


@pytest.fixture
def planted_study(tiny_model_dir, tmp_path) -> tuple[Path, Path, dict]:
    """8 seeds: delta = none + 0.1 held-out accuracy and a faster reward; same = none +- 0.02; same/seed-7 unfinished."""
    study = _study(tmp_path, tiny_model_dir, stage2={"export": str(_fake_export(tmp_path, gain=-0.002))})
    runs = tmp_path / "out/arithmetic/tiny-llama/studies/planted/runs"
    rng = np.random.default_rng(0)
    base = {s: float(a) for s, a in zip(SEEDS, rng.uniform(0.3, 0.6, len(SEEDS)), strict=True)}
    ramp = np.linspace(0.0, 0.5, 10)
    for s in SEEDS:
        _write_run(runs / "none" / f"seed-{s}", base[s], ramp, 0.2)
        _write_run(runs / "delta" / f"seed-{s}", base[s] + 0.1, np.minimum(ramp * 2, 0.5), 0.55)
        _write_run(runs / "same" / f"seed-{s}", base[s] + 0.02 * (-1) ** s, ramp, 0.2, finished=s != 7)
    return study, runs.parent, base


def test_aggregate_finds_the_planted_difference_and_writes_the_report(planted_study):
    study, study_dir, base = planted_study
    result = _invoke("--study", str(study), "--aggregate")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(study_dir / "summary.csv")
    assert len(summary) == 23, "same/seed-7 has no metadata.json: not finished, left out"
    delta = summary[summary["arm"] == "delta"].set_index("seed")
    assert delta.loc[3, "final_accuracy"] == pytest.approx(base[3] + 0.1)
    assert delta.loc[3, "accuracy/level_4"] == pytest.approx(base[3] + 0.2)
    assert delta["reward_auc"].iloc[0] == pytest.approx(np.minimum(np.linspace(0, 1, 10), 0.5).mean())
    # threshold = none's final reward (mean of the last 3 steps: 0.444); none's 3-step average gets there at
    # step 10, delta's at step 7
    assert set(summary[summary["arm"] == "none"]["steps_to_threshold"]) == {10.0}
    assert set(delta["steps_to_threshold"]) == {7.0}
    comparisons = pd.read_csv(study_dir / "comparisons.csv").set_index(["arm", "metric"])
    d = comparisons.loc[("delta", "final_accuracy")]
    assert d["mean_difference"] == pytest.approx(0.1) and d["ci95_low"] > 0
    assert d["p_value"] == pytest.approx(2 / 256) and d["p_holm"] == pytest.approx(2 * 2 / 256)
    assert d["verdict"] == "significant, delta better"
    assert comparisons.loc[("delta", "steps_to_threshold"), "verdict"] == "significant, delta better"
    same = comparisons.loc[("same", "final_accuracy")]
    assert same["seeds"] == 7 and same["ci95_low"] < 0 < same["ci95_high"] and same["verdict"] == "not significant"
    report = (study_dir / "report.md").read_text()
    assert ("delta vs none: +0.100 held-out accuracy [+0.100, +0.100], p = 0.0078 (Holm 0.016) over 8 seeds: "
            "significant, delta better") in report
    assert "Not finished (left out of everything below): same/seed-7." in report
    assert "gain -0.0020 nats/pair [95% CI -0.0060, +0.0000] over 95 pairs, 16 validation prompts" in report
    assert "WARNING: the gain is not above 0" in report
    assert "| delta | 8 |" in report and "0.550" in report, "the arm table shows delta's weight concentration"
    for png in ("reward_curves.png", "accuracy_curves.png", "paired_differences.png"):
        assert (study_dir / png).stat().st_size > 5000 and f"({png})" in report
    assert (study_dir / "importance_calibration.png").read_bytes() == b"png calibration"
    html = (study_dir / "report.html").read_text()
    assert "<img src='reward_curves.png'" in html and "significant, delta better" in html
    assert "delta vs none: +0.100" in result.stdout, "the verdicts are printed too"


def test_aggregate_before_any_run_finished(tiny_model_dir, tmp_path):
    line = _one_error_line(_invoke("--study", str(_study(tmp_path, tiny_model_dir, arms={"none": {}})), "--aggregate"))
    assert "no finished run" in line and "run the study first" in line
