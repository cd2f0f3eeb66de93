"""run_study.py --slurm against the fake sbatch (tests/fake_bin): the job chain and what each array task runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from run_study import main
from train_grpo_softmask import main as stage3_main

ROOT = Path(__file__).resolve().parents[1]
FAKE_BIN = ROOT / "tests" / "fake_bin"


@pytest.fixture
def slurm_env(monkeypatch, tmp_path) -> Path:
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    return log


def _study(tmp_path: Path, model_dir: Path) -> Path:
    data = {"name": "onslurm", "model_name": str(model_dir), "task_name": "arithmetic", "out_dir": str(tmp_path / "out"),
            "stage1": {"num_prompts": 64}, "stage2": {"max_epochs": 3},
            "stage3": {"max_steps": 100, "lr": 2e-6}, "seeds": [0, 1], "baseline": "none",
            "arms": {"none": {"softmask": "none"}, "shuffled": {"softmask": "shuffled"}},
            "slurm": {"shards": 4, "max_parallel": 2, "sbatch": {"stage3": "--time=02:00:00 --gres=gpu:1"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _calls(log: Path) -> list[list[str]]:
    return [line.split("\t") for line in log.read_text().splitlines()]


def _value(call: list[str], flag: str) -> str:
    (found,) = [arg.split("=", 1)[1] for arg in call if arg.startswith(f"{flag}=")]
    return found


def _array_task_argv(listing: Path, task: int) -> list[str]:
    """The stage-3 command line the template runs for array task ``task``, as bash expands it."""
    text = (ROOT / "slurm" / "stage3_grpo.sbatch").read_text()
    block = text[text.index("# >>> command"):text.index("# <<< command")]
    script = f'set -euo pipefail\nsource slurm/common.sh >/dev/null\n{block}\nprintf "%s\\0" "${{cmd[@]}}"'
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "9",
           "RVG_ARRAY_CONFIGS": str(listing), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().split("\0")[:-1]


def test_slurm_submits_the_shared_stages_one_array_and_a_dependent_report(slurm_env, tiny_model_dir, tmp_path):
    study = _study(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(main, ["--study", str(study), "--slurm"])
    assert result.exit_code == 0, result.output
    stage1, stage2, stage3, report = _calls(slurm_env)
    study_dir = tmp_path / "out/arithmetic/tiny-llama/studies/onslurm"
    assert stage1[0] == "--array=0-3" and stage1[-3:] == ["slurm/stage1_rollouts.sbatch", "--config",
                                                          str(study_dir / "configs/stage1.yaml")]
    assert stage2[:2] == ["--dependency=afterok:1001", "--kill-on-invalid-dep=yes"]
    assert stage2[-3:] == ["slurm/stage2_importance.sbatch", "--config", str(study_dir / "configs/stage2.yaml")]
    assert _value(stage3, "--array") == "0-3%2" and _value(stage3, "--dependency") == "afterok:1002"
    assert stage3[-3:] == ["--time=02:00:00", "--gres=gpu:1", "slurm/stage3_grpo.sbatch"]
    assert _value(report, "--dependency") == "afterany:1003"
    assert report[-1].startswith("--wrap=bash -c ") and f"run_study.py --study {study} --aggregate" in report[-1]
    for job in ("job 1001", "job 1002", "job 1003", "job 1004"):
        assert job in result.stdout
    listing = Path(_value(stage3, "--export").split("RVG_ARRAY_CONFIGS=", 1)[1])
    assert listing.read_text().splitlines() == [str(study_dir / f"configs/{arm}/seed-{s}.yaml")
                                                for s in (0, 1) for arm in ("none", "shuffled")]
    stage1_config = yaml.safe_load((study_dir / "configs/stage1.yaml").read_text())
    stage2_config = yaml.safe_load((study_dir / "configs/stage2.yaml").read_text())
    dump = tmp_path / "out/arithmetic/tiny-llama" / f"rollouts_{stage1_config['tag']}"
    assert stage1_config["num_prompts"] == 64 and stage2_config["rollouts"] == str(dump)
    # array task 3 = shuffled, seed 1: the template hands its config to stage 3's own parser
    argv = _array_task_argv(listing, 3)
    assert argv[:2] == ["python", "train_grpo_softmask.py"]
    params = stage3_main.make_context("train_grpo_softmask.py", argv[2:]).params
    assert (params["softmask"], params["seed"], params["max_steps"], params["backend"]) == ("shuffled", 1, 100, "auto")
    assert params["resume"] and params["importance_net"] == str(dump.parent / "importance_net" /
                                                                stage2_config["run_name"] / "export")
    assert params["run_name"] == "../studies/onslurm/runs/shuffled/seed-1"


def test_slurm_resubmits_only_what_is_left(slurm_env, tiny_model_dir, tmp_path):
    """Once the importance net is done neither stage 1 nor 2 is submitted; finished runs are left out."""
    study = _study(tmp_path, tiny_model_dir)
    assert CliRunner().invoke(main, ["--study", str(study), "--slurm"]).exit_code == 0
    study_dir = tmp_path / "out/arithmetic/tiny-llama/studies/onslurm"
    stage2_config = yaml.safe_load((study_dir / "configs/stage2.yaml").read_text())
    imp = Path(stage2_config["rollouts"]).parent / "importance_net" / stage2_config["run_name"]
    (imp / "export").mkdir(parents=True)
    (imp / "export" / "importance_net.json").write_text("{}")
    (imp / "metadata.json").write_text(json.dumps({"status": "done"}))
    for done in ("none/seed-0", "shuffled/seed-0", "none/seed-1"):
        (study_dir / "runs" / done).mkdir(parents=True)
        (study_dir / "runs" / done / "metadata.json").write_text("{}")
    slurm_env.unlink()
    assert CliRunner().invoke(main, ["--study", str(study), "--slurm"]).exit_code == 0
    stage3, report = _calls(slurm_env)
    assert _value(stage3, "--array") == "0-0%2" and not any(a.startswith("--dependency") for a in stage3)
    listing = Path(_value(stage3, "--export").split("RVG_ARRAY_CONFIGS=", 1)[1])
    assert listing.read_text().splitlines() == [str(study_dir / "configs/shuffled/seed-1.yaml")]
    assert _value(report, "--dependency") == "afterany:1001"


def test_slurm_without_sbatch_is_one_line(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(main, ["--study", str(_study(tmp_path, tiny_model_dir)), "--slurm"])
    assert result.exit_code == 2 and "sbatch not found" in result.stderr
