"""Rewards: right, wrong and malformed answers per task; hostile countdown text never executes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import rewards
from pipeline import scoring
from pipeline.answers import evaluate_arithmetic

COUNTDOWN = {"task_name": "countdown", "numbers": [25, 4, 3], "target": 97, "answer": "97"}


COUNTDOWN_REWARDS = ("correct", "format", "valid_expression", "uses_numbers")


def countdown_scores(completion: str) -> dict[str, float]:
    cols = {k: [v] for k, v in COUNTDOWN.items()}
    return {name: rewards.REWARDS[name]([""], [completion], **cols)[0] for name in COUNTDOWN_REWARDS}


@pytest.mark.parametrize("completion, expected", [
    ("25*4 - 3 = 97 so <answer>25 * 4 - 3</answer>", {"correct": 1, "format": 1, "valid_expression": 1, "uses_numbers": 1}),
    ("<answer>(25 - 3) * 4</answer>", {"correct": 0, "format": 1, "valid_expression": 1, "uses_numbers": 1}),
    ("<answer>25 * 4</answer>", {"correct": 0, "format": 1, "valid_expression": 1, "uses_numbers": 0}),
    ("<answer>100 - 3</answer>", {"correct": 0, "format": 1, "valid_expression": 1, "uses_numbers": 0}),
    ("the answer is 25*4-3", {"correct": 0, "format": 0, "valid_expression": 0, "uses_numbers": 0}),
    ("<answer>25 * 4 - 3 = 97</answer>", {"correct": 1, "format": 1, "valid_expression": 1, "uses_numbers": 1}),
    ("<answer>25 ** 4 - 3</answer>", {"correct": 0, "format": 1, "valid_expression": 0, "uses_numbers": 0}),
])
def test_countdown_rewards(completion, expected):
    assert countdown_scores(completion) == expected


HOSTILE = [
    "<answer>__import__('os').system('touch /tmp/rvg_pwned')</answer>",
    "<answer>9**9**9**9</answer>",
    "<answer>(25 + 4) / (3 - 3)</answer>",
    "<answer>" + "(" * 500 + "1" + ")" * 500 + "</answer>",
    "<answer>[x for x in ().__class__.__base__.__subclasses__()]</answer>",
    "<answer>lambda: 97</answer>",
    "<answer>25*4-3; open('/etc/passwd')</answer>",
    "<answer>1e308 * 1e308</answer>",
    "<answer>" + "*".join(["99999"] * 40) + "</answer>",
]


@pytest.mark.parametrize("completion", HOSTILE)
def test_hostile_countdown_outputs_score_zero(completion, tmp_path):
    scores = countdown_scores(completion)
    assert scores["correct"] == 0 and scores["uses_numbers"] == 0 and scores["valid_expression"] == 0


def test_walker_rejects_before_computing():
    assert evaluate_arithmetic("__import__('os')") is None
    assert evaluate_arithmetic("2**100000000") is None
    value, literals = evaluate_arithmetic("(25 - 3) / 4")
    assert value == 5.5 and literals == [25, 3, 4]


@pytest.mark.parametrize("completion, score", [
    ("12 + 7 is <answer>19</answer>", 1.0),
    ("<answer>19.0</answer>", 1.0),
    ("<answer>\\boxed{19}</answer>", 1.0),
    ("<answer>18</answer>", 0.0),
    ("12 + 7 = 19", 1.0),  # untagged: the last answer in the text (format is rewarded apart)
    ("it is 18", 0.0),
    ("<answer></answer>", 0.0),
    ("<answer>nineteen ]]}{</answer>", 0.0),
])
def test_arithmetic_correct(completion, score):
    assert rewards.correct([""], [completion], answer=["19"], task_name=["arithmetic"]) == [score]


def test_format_requires_exactly_one_tag():
    out = rewards.format_reward(None, ["<answer>1</answer>", "<answer>1</answer><answer>2</answer>", "1"])
    assert out == [1.0, 0.0, 0.0]


def test_failing_rows_are_recorded_not_fatal(monkeypatch):
    def flaky(prompts, completions, **_):
        return [math.nan if "nan" in c else None if "none" in c else 1 / 0 if "raise" in c else 1.0
                for c in completions]

    monkeypatch.setitem(rewards.REWARDS, "flaky", flaky)
    texts = ["ok", "nan", "none", "raise", "<answer>1</answer> raise"]
    batch = scoring.score({"flaky": 1.0, "format": 0.5}, [{"answer": "1"}] * 5, ["p"] * 5, texts, [[1]] * 5)
    assert batch.failures == {"flaky": 2}  # only the rows it raised on; None and NaN mean "no reward"
    np.testing.assert_array_equal(batch.per_function["flaky"][:1], [1.0])
    assert np.isnan(batch.per_function["flaky"][1:]).all()
    # the total is the weighted nansum: format's 0 counts where flaky gave nothing
    np.testing.assert_array_equal(batch.total, [1.0, 0.0, 0.0, 0.0, 0.5])


def test_reward_weights_parsing():
    assert scoring.parse_reward_weights("correct=1,format=0.25", {}) == {"correct": 1.0, "format": 0.25}
    assert scoring.parse_reward_weights(None, {"correct": 1.0}) == {"correct": 1.0}
