"""Bad input to train_importance_net.py: exit code 2, one line that names the problem, nothing written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.models import load_tokenizer
from tests.synthetic_dump import write_synthetic_dump
from train_importance_net import main

ROOT = Path(__file__).resolve().parents[1]


def _dump(model_dir, tmp_path, **kwargs) -> Path:
    path = tmp_path / "synthetic" / "tiny" / "rollouts_t" / "part-00000.parquet"
    kwargs = {"n_prompts": 6, "groups_per_prompt": 1, **kwargs}
    return write_synthetic_dump(path, load_tokenizer(str(model_dir)), str(model_dir), **kwargs)


def _fails(args: list[str], pattern: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize(("kwargs", "args", "pattern"), [
    ({"drop_columns": ("split_token_idx", "reward")}, [], r"lack column\(s\) split_token_idx, reward:"),
    ({"drop_columns": ("reward_group_var",)}, ["--group_stats", "group"], r"lack column\(s\) reward_group_var"),
    ({"n_prompts": 0}, [], r"hold no rows"),
    ({"zero_variance_prompts": 6}, [], r"no informative pair .*in zero-variance groups"),
    ({"zero_variance_prompts": 6}, ["--group_stats", "group"], r"no informative pair .*in zero-variance groups"),
])
def test_bad_dumps_are_refused(tiny_model_dir, tmp_path, kwargs, args, pattern):
    dump = _dump(tiny_model_dir, tmp_path, **kwargs)
    _fails(["--rollouts", str(dump.parent), *args], pattern)
    assert not (dump.parents[1] / "importance_net").exists()


def test_zero_variance_message_counts_pairs(tiny_model_dir, tmp_path):
    dump = _dump(tiny_model_dir, tmp_path, zero_variance_prompts=6)
    line = _fails(["--rollouts", str(dump)], "zero-variance")
    degenerate, zero = (int(x) for x in re.search(r"(\d+) degenerate.* (\d+) in zero-variance", line).groups())
    assert degenerate + zero == 6 * 4


def test_mismatched_tokenizer_is_refused(tiny_model_dir, other_tokenizer_model_dir, tmp_path):
    dump = _dump(tiny_model_dir, tmp_path)
    _fails(["--rollouts", str(dump), "--backbone", str(other_tokenizer_model_dir)],
           r"backbone '.*tiny-other' has a different tokenizer .*pass --backbone")


def test_missing_rollouts_and_bad_options_are_refused(tiny_model_dir, tmp_path):
    _fails(["--rollouts", str(tmp_path / "nowhere")], "not found")
    dump = _dump(tiny_model_dir, tmp_path)
    _fails(["--rollouts", str(dump), "--reward_key", "nope"], r"--reward_key 'nope'.*reward_marker")
    assert not (dump.parents[1] / "importance_net").exists()
    _fails(["--rollouts", str(dump), "--likelihood", "bernoulli"],
           r"--likelihood bernoulli needs a 0/1 reward column, but 'reward' has other values")
    _fails(["--rollouts", str(dump), "--patience", "-1"], r"--patience.*-1 is not in the range x>=0")
    _fails(["--rollouts", str(dump), "--f_form", "wavy"], r"'wavy' is not one of 'direct', 'monotone'")
    assert not (dump.parents[1] / "importance_net").exists()
    result = CliRunner().invoke(main, ["--rollouts", str(dump), "--backbone_mode", "last_k", "--last_k", "5"])
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: --last_k must be in 1..2")
    assert not (dump.parents[1] / "importance_net").exists()


@pytest.mark.slow  # a fresh interpreter: ~10-30 s of imports
def test_real_process_exit_code_and_single_line(tiny_model_dir, tmp_path):
    dump = _dump(tiny_model_dir, tmp_path, n_prompts=0)
    out = subprocess.run([sys.executable, "train_importance_net.py", "--rollouts", str(dump)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: rollouts '{dump}' hold no rows: the stage-1 run wrote "
                                               f"nothing, re-run it"]
