"""Hybrid reward: the formula, reward-model scoring, calibration saved and reused, the registry entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import rewards
from pipeline import hybrid_reward, scoring
from pipeline.errors import UserError
from pipeline.hybrid_reward import combine, configure_hybrid
from tests.tiny_model import build_tokenizer

PROMPTS = ["<|im_start|>user\nCalculate 12 + 7.<|im_end|>\n<|im_start|>assistant\n"] * 4
QUESTIONS = ["Calculate 12 + 7."] * 4
COMPLETIONS = ["<answer>19</answer>", "12 + 7 = 19 so <answer>19</answer>", "<answer>18</answer>", "no idea"]
COLUMNS = {"answer": ["19"] * 4, "task_name": ["arithmetic"] * 4, "question": QUESTIONS}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A random 2-layer Llama sequence classifier with one output, and the tests' tiny tokenizer."""
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_active_hybrid(monkeypatch):
    monkeypatch.setattr(hybrid_reward, "_active", None)


def test_formula_on_hand_computed_values():
    # min 0, max 2, eps 0.01 -> scale (s - 0) / 2.01
    got = combine([1, 1, 0, 0, 1], [0.0, 2.0, 0.0, 2.0, 1.0], low=0.0, high=2.0)
    want = [0.5, 0.5 + 1.0 * 2 / 2.01, -0.5, -0.5 + 1.0 * 2 / 2.01, 0.5 + 1 / 2.01]
    np.testing.assert_allclose(got, want)
    got = combine([1, 0], [3.0, 3.0], low=1.0, high=3.0, alpha=0.2, beta=0.4, eps=0.0)
    np.testing.assert_allclose(got, [0.6 + 0.8, -0.2 + 0.4])


def test_calibration_is_saved_then_reused(reward_model_dir, tmp_path):
    state = tmp_path / "hybrid_calibration.json"
    hybrid = configure_hybrid(str(reward_model_dir), state)
    assert hybrid.calibration is None
    scores = hybrid.scores(PROMPTS, COMPLETIONS, QUESTIONS)
    saved = hybrid.calibrate(PROMPTS, COMPLETIONS, QUESTIONS)
    assert (saved["min"], saved["max"], saved["num_samples"]) == (scores.min(), scores.max(), 4)
    assert json.loads(state.read_text()) == saved
    again = configure_hybrid(str(reward_model_dir), state)
    assert again.calibration == saved  # same timestamp: loaded, not recomputed
    assert hybrid_reward.active_hybrid() is again
    assert again.metadata()["calibration"] == saved and again.metadata()["alpha"] == 0.5


def test_hybrid_reward_in_the_registry(reward_model_dir, tmp_path):
    hybrid = configure_hybrid(str(reward_model_dir), tmp_path / "calibration.json", alpha=0.3, beta=0.6)
    hybrid.calibrate(PROMPTS, COMPLETIONS, QUESTIONS)
    rows = [dict(zip(COLUMNS, values, strict=True)) for values in zip(*COLUMNS.values(), strict=True)]
    batch = scoring.score({"hybrid": 1.0, "correct": 1.0}, rows, PROMPTS, COMPLETIONS, [[1]] * 4)
    assert not batch.failures
    verified = [1.0, 1.0, 0.0, 0.0]
    np.testing.assert_array_equal(batch.per_function["correct"], verified)
    low, high = hybrid.calibration["min"], hybrid.calibration["max"]
    want = combine(verified, hybrid.scores(PROMPTS, COMPLETIONS, QUESTIONS), low, high, 0.3, 0.6, 0.01)
    np.testing.assert_allclose(batch.per_function["hybrid"], want, rtol=1e-5)
    assert min(want[:2]) >= 0.4 > 0.3 > max(want[2:])  # in the calibrated range right beats wrong


def test_scores_do_not_depend_on_batching(reward_model_dir, tmp_path):
    hybrid = configure_hybrid(str(reward_model_dir), tmp_path / "c.json", batch_size=4)
    together = hybrid.scores(PROMPTS, COMPLETIONS)
    alone = [hybrid.scores([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(together, 6))) == 4


def test_misuse_fails_clearly(reward_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="pass --reward_model"):
        rewards.hybrid(PROMPTS, COMPLETIONS, **COLUMNS)
    hybrid = configure_hybrid(str(reward_model_dir), tmp_path / "c.json")
    with pytest.raises(RuntimeError, match="never calibrated"):
        rewards.hybrid(PROMPTS, COMPLETIONS, **COLUMNS)
    with pytest.raises(UserError, match="at least one completion"):
        hybrid.calibrate([], [])
    (tmp_path / "other.json").write_text(json.dumps({"reward_model": "someone/else", "min": 0, "max": 1}))
    with pytest.raises(UserError, match="someone/else"):
        configure_hybrid(str(reward_model_dir), tmp_path / "other.json")
    with pytest.raises(UserError, match="eps > 0"):
        configure_hybrid(str(reward_model_dir), tmp_path / "c.json", eps=0)


def test_stage1_and_stage3_train_on_the_hybrid_reward(reward_model_dir, tiny_model_dir, tmp_path):
    """Through both CLIs: calibrated once, dumped with group statistics, reused on resume, trained on."""
    from click.testing import CliRunner

    from generate_paired_rollouts import main as stage1
    from pipeline.dump import read_dump
    from train_grpo_softmask import main as stage3

    common = ["--model_name", str(tiny_model_dir), "--task_name", "arithmetic", "--max_new_tokens", "6",
              "--rewards", "correct=1,hybrid=1", "--reward_model", str(reward_model_dir),
              "--rm_calibration_prompts", "3", "--out_dir", str(tmp_path)]
    result = CliRunner().invoke(stage1, [*common, "--group_size", "4", "--num_prompts", "2"])
    assert result.exit_code == 0, result.output
    (dump,) = tmp_path.glob("arithmetic/tiny-llama/rollouts_*")
    frame = read_dump(dump).to_pandas()
    assert np.isfinite(frame["reward_hybrid"]).all() and frame["reward_hybrid_group_var"].gt(0).all()
    calibration = json.loads((dump / "hybrid_calibration.json").read_text())
    assert calibration["num_samples"] == 2 and calibration["min"] < calibration["max"]
    meta = json.loads((dump / "rollouts_metadata.json").read_text())
    assert meta["hybrid_reward"]["calibration"] == calibration

    result = CliRunner().invoke(stage3, [*common, "--group_size", "2", "--prompts_per_step", "2",
                                         "--max_steps", "1", "--eval_prompts", "1", "--num_train_prompts", "4"])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("arithmetic/tiny-llama/grpo/*")
    created = json.loads((run / "hybrid_calibration.json").read_text())["created"]
    result = CliRunner().invoke(stage3, [*common, "--group_size", "2", "--prompts_per_step", "2",
                                         "--max_steps", "2", "--eval_prompts", "1", "--num_train_prompts", "4",
                                         "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "hybrid_calibration.json").read_text())["created"] == created
    assert "reward/hybrid" in (run / "metrics.csv").read_text()


def test_hybrid_without_reward_model_is_refused(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from generate_paired_rollouts import main as stage1

    result = CliRunner().invoke(stage1, ["--model_name", str(tiny_model_dir), "--task_name", "arithmetic",
                                         "--rewards", "hybrid=1", "--out_dir", str(tmp_path)])
    assert result.exit_code == 2 and "--rewards hybrid needs --reward_model" in result.stderr
