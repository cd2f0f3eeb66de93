"""Stage 1 through its CLI on a tiny random model, plus the pairing scheme on a stub backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from generate_paired_rollouts import main
from pipeline import stage1
from pipeline.dump import REQUIRED_COLUMNS, read_dump, read_metadata
from pipeline.generation import SamplingParams
from pipeline.rollouts import PairingConfig, Prompt, sample_pairs, split_limits
from tests.file_tree import tree_digest
from tests.stub_backend import GeometricBackend

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _dump_args(model_dir: Path, out: Path) -> list[str]:
    return ["--model_name", str(model_dir), "--task_name", "countdown", "--group-size", "4", "--num_prompts", "6",
            "--max_new_tokens", "16", "--out_dir", str(out), "--prompts_per_chunk", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def dump(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    result = run_cli(*_dump_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    (path,) = (out / "countdown" / "tiny-llama").glob("rollouts_*")
    return path


def test_schema_and_metadata(dump):
    frame = read_dump(dump).to_pandas()
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    for name in ("correct", "format", "valid_expression", "uses_numbers"):
        assert {f"reward_{name}", f"reward_{name}_group_mean", f"reward_{name}_group_var"} <= set(frame.columns)
    assert len(frame) == 6 * 4
    kv = read_metadata(dump)
    assert kv["reward_names"] == ["correct", "format", "valid_expression", "uses_numbers"]
    assert kv["schema_version"] == "2" and kv["tokenizer"]["vocab_size"] == 300
    meta = json.loads((dump / "rollouts_metadata.json").read_text())
    assert meta["counts"]["groups"] == 6 and meta["counts"]["pairs"] == 12
    assert meta["arguments"]["group_size"] == 4 and meta["tokens_per_s"] > 0


def test_rerunning_a_finished_dump_changes_nothing(dump, tiny_model_dir):
    before = tree_digest(dump.parent)
    result = run_cli(*_dump_args(tiny_model_dir, dump.parents[2]))
    assert result.exit_code == 0, result.output
    assert tree_digest(dump.parent) == before, "the finished dump and its rollouts_metadata.json stay as they were"


def _small(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(model_dir), "--task_name", "arithmetic", "--levels", "0,1", "--group_size", "2",
            "--num_prompts", "4", "--prompts_per_chunk", "1", "--max_new_tokens", "4", "--out_dir", str(out),
            "--tag", "t", *extra]


def test_overwrite_replaces_the_dump_only_once_the_new_one_is_complete(tiny_model_dir, tmp_path, monkeypatch):
    assert run_cli(*_small(tiny_model_dir, tmp_path)).exit_code == 0
    path = tmp_path / "arithmetic" / "tiny-llama" / "rollouts_t"
    old = tree_digest(path)
    calls = []
    real = stage1.sample_pairs

    def dies_on_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1, "sample_pairs", dies_on_the_third_chunk)
    crashed = CliRunner().invoke(main, _small(tiny_model_dir, tmp_path, "--seed", "1", "--overwrite"))
    assert isinstance(crashed.exception, RuntimeError)
    assert tree_digest(path) == old, "a failed --overwrite leaves the old dump whole"
    assert len(list(stage1.staging_dir(path).glob("part-*.parquet"))) == 2
    monkeypatch.setattr(stage1, "sample_pairs", real)
    result = run_cli(*_small(tiny_model_dir, tmp_path, "--seed", "1", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((path / "run_config.json").read_text())["seed"] == 1
    assert json.loads((path / "rollouts_metadata.json").read_text())["chunks_generated_this_run"] == 2
    assert len(read_dump(path)) == 4 * 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["rollouts_t"], "no staging or old copy is left"


def test_overwrite_by_shards_swaps_in_when_the_last_shard_finishes(tiny_model_dir, tmp_path):
    assert run_cli(*_small(tiny_model_dir, tmp_path)).exit_code == 0
    path = tmp_path / "arithmetic" / "tiny-llama" / "rollouts_t"
    old = tree_digest(path)
    shard = ["--seed", "1", "--overwrite", "--num_shards", "2"]
    assert run_cli(*_small(tiny_model_dir, tmp_path, *shard, "--shard_index", "1")).exit_code == 0
    assert tree_digest(path) == old, "one shard of two leaves the old dump in place"
    assert run_cli(*_small(tiny_model_dir, tmp_path, *shard, "--shard_index", "0")).exit_code == 0
    assert json.loads((path / "run_config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in path.glob("*.json")) == [
        "rollouts_metadata.shard-000-of-002.json", "rollouts_metadata.shard-001-of-002.json", "run_config.json"]
    assert sorted(p.name for p in path.glob("part-*.parquet")) == [f"part-{c:05d}.parquet" for c in range(4)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rollouts_t"]
    straight = tmp_path / "straight"
    assert run_cli(*_small(tiny_model_dir, straight, "--seed", "1")).exit_code == 0
    key = ["group_id", "completion_id"]
    sharded = read_dump(path).to_pandas().sort_values(key).reset_index(drop=True)
    single = read_dump(next(straight.glob("**/rollouts_t"))).to_pandas().sort_values(key).reset_index(drop=True)
    assert sharded["completion_token_ids"].map(list).equals(single["completion_token_ids"].map(list))


def test_group_statistics_match_pandas(dump):
    frame = read_dump(dump).to_pandas()
    grouped = frame.groupby("group_id")
    for column in ("reward", "reward_format", "reward_correct"):
        np.testing.assert_allclose(frame[f"{column}_group_mean"], grouped[column].transform("mean"))
        np.testing.assert_allclose(frame[f"{column}_group_var"], grouped[column].transform("var"))
    np.testing.assert_allclose(frame["reward"], frame["reward_correct"] + 0.1 * frame["reward_format"])


def test_sisters_share_exactly_the_split_prefix(dump):
    frame = read_dump(dump).to_pandas()
    for (_, _), pair in frame.groupby(["group_id", "pair_id"]):
        a, b = (pair[pair["sister"] == s].iloc[0] for s in (0, 1))
        t = a["split_token_idx"]
        assert t == b["split_token_idx"]
        assert list(a["completion_token_ids"][:t]) == list(b["completion_token_ids"][:t])
        assert a["degenerate"] == (len(a["completion_token_ids"]) <= t)
        if a["degenerate"]:
            assert list(a["completion_token_ids"]) == list(b["completion_token_ids"])
    for _, group in frame.groupby("group_id"):
        assert sorted(group["completion_id"]) == [0, 1, 2, 3]
        assert sorted(group["pair_id"] * 2 + group["sister"]) == [0, 1, 2, 3]


def _stub_prompts(n: int) -> list[Prompt]:
    return [Prompt(i, {"prompt_id": i}, f"p{i}", [1, 2, 3]) for i in range(n)]


def test_split_point_is_independent_of_the_sister_it_splits():
    """A's and B's continuations after the split have the same length law (exchangeability)."""
    params = SamplingParams(max_new_tokens=60)
    records = sample_pairs(GeometricBackend(), _stub_prompts(200), params, PairingConfig(group_size=8), seed=0,
                           rng=np.random.default_rng(0))
    frame = pd.DataFrame([{"pair": (r["group_id"], r["pair_id"]), "sister": r["sister"],
                           "t": r["split_token_idx"], "n": len(r["completion"].token_ids),
                           "degenerate": r["degenerate"]} for r in records])
    live = frame[~frame["degenerate"]]
    residual_a = (live[live.sister == 0].n - live[live.sister == 0].t).to_numpy()
    residual_b = (live[live.sister == 1].n - live[live.sister == 1].t).to_numpy()
    assert len(residual_a) > 250
    assert stats.ks_2samp(residual_a, residual_b).pvalue > 0.05
    # Power check: choosing t after seeing A (t ~ U[0, len A)) would bias A's residual short.
    a_lengths = frame[frame.sister == 0].n.to_numpy()
    rng = np.random.default_rng(1)
    biased_t = np.array([rng.integers(0, n) for n in a_lengths if n > 0])
    biased_residual = a_lengths[a_lengths > 0] - biased_t
    assert stats.ks_2samp(biased_residual, residual_b).pvalue < 1e-3


def test_split_limit_ignores_the_pair_itself():
    """Each pair's t_max comes from its prompt's other sister-A lengths: a prompt's own length scale, never A's."""
    limits = split_limits([[100, 20, 60], [10, 10], [7], [3]], 200, quantile=1.0)
    assert limits == [[60, 100, 100], [10, 10], [100], [100]]  # one pair: the other prompts' lengths
    assert split_limits([[5]], 50, quantile=0.9) == [[50]]  # nothing else seen: the whole budget


def test_fixed_split_limit_caps_every_split():
    """--max_split_tokens replaces the quantile rule: every t lies in 0..min(max_split_tokens, max_new_tokens)."""
    records = sample_pairs(GeometricBackend(), _stub_prompts(40), SamplingParams(max_new_tokens=50),
                           PairingConfig(group_size=8, max_split_tokens=7), seed=0, rng=np.random.default_rng(0))
    splits = [r["split_token_idx"] for r in records]
    assert max(splits) == 7 and min(splits) == 0


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    args = ["--model_name", str(tiny_model_dir), "--task_name", "arithmetic", "--group_size", "2",
            "--num_prompts", "24", "--prompts_per_chunk", "1", "--max_new_tokens", "24", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "generate_paired_rollouts.py")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *args, "--out_dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("**/part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(killed.glob("**/part-*.parquet")))
    assert 2 <= written < 24, "the kill must land mid-run"
    subprocess.run([sys.executable, script, *args, "--out_dir", str(killed)], env=env, check=True,
                   capture_output=True)
    assert run_cli(*args, "--out_dir", str(tmp_path / "straight")).exit_code == 0
    resumed = read_dump(next(killed.glob("**/rollouts_*"))).to_pandas()
    straight = read_dump(next((tmp_path / "straight").glob("**/rollouts_*"))).to_pandas()
    key = ["group_id", "completion_id"]
    resumed, straight = resumed.sort_values(key).reset_index(drop=True), straight.sort_values(key).reset_index(drop=True)
    assert len(resumed) == len(straight) == 48
    assert resumed[key].equals(straight[key])
    assert resumed["completion_token_ids"].map(list).equals(straight["completion_token_ids"].map(list))


@pytest.mark.parametrize("args, message", [
    (["--group_size", "3"], "--group_size must be even"),
    (["--task_name", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["--model_name", "./no/such/model"], "not found"),
    (["--levels", "0,9"], "no level(s) [9]"),
    (["--rewards", "correct=1,bogus=2"], "unknown reward(s) bogus"),
])
def test_bad_input_exits_2_with_one_line(args, message, tiny_model_dir, tmp_path):
    base = ["--model_name", str(tiny_model_dir), "--out_dir", str(tmp_path)]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not list(tmp_path.glob("**/part-*.parquet"))


def test_unwritable_out_dir_and_bad_config(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), "--out_dir", str(blocker / "sub")])
    assert result.exit_code == 2 and "pass a writable --out_dir" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("group_size: [\n")
    result = CliRunner().invoke(main, ["--config", str(bad)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "fix the file" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("group_sise: 4\n")
    result = CliRunner().invoke(main, ["--config", str(unknown)])
    assert result.exit_code == 2 and "group_sise" in result.stderr


def test_config_file_sets_defaults_and_flags_win(tiny_model_dir, tmp_path):
    config = tmp_path / "stage1.yaml"
    config.write_text(f"model-name: {tiny_model_dir}\ngroup_size: 2\nnum_prompts: 2\nmax_new_tokens: 4\n"
                      f"task_name: arithmetic\nout_dir: {tmp_path}\n")
    assert run_cli("--config", str(config), "--num_prompts", "1").exit_code == 0
    frame = read_dump(next(tmp_path.glob("arithmetic/*/rollouts_*"))).to_pandas()
    assert len(frame) == 2 and frame["prompt_id"].nunique() == 1
