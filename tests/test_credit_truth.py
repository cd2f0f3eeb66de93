"""The credit task's truth in stages 2 and 3: the oracle importance source, the comparison with a net's f,
the per-step share of soft-mask weight on decision tokens, and the options that feed them."""

import random

import numpy as np
import pytest
import torch

from pipeline.credit_truth import OracleImportance, compare, step_metrics
from pipeline.errors import UserError
from pipeline.generation.base import Completion
from pipeline.grpo.config import GRPOArgs, validate
from pipeline.grpo.evaluation import score_prompts
from pipeline.grpo.online_importance import OnlineImportance, OnlineOptions
from pipeline.tasks.credit import Spec, decision_accuracy, decision_mask, make_spec, sample_completion, true_f
from tests.test_online_importance import _synthetic_step


def _batch(n: int = 24, level: int = 1, p_right: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    specs = [make_spec(level, rng) for _ in range(n)]
    return [s.to_answer() for s in specs], [sample_completion(s, p_right, rng) for s in specs]


def test_oracle_is_the_true_f_under_the_steps_own_accuracy():
    answers, texts = _batch(level=3)
    lengths = [len(t.split()) + 1 for t in texts]  # + the stop token
    width = max(lengths) + 3
    f = OracleImportance().score_padded(answers, texts, lengths, width)
    accuracy = decision_accuracy(answers, texts)
    assert f.shape == (len(answers), width + 1)
    for i, (answer, n) in enumerate(zip(answers, lengths, strict=True)):
        spec = Spec.from_answer(answer)
        p = [accuracy[((spec.length, 3, "graded", 0.1), j)] for j in range(3)]
        np.testing.assert_allclose(f[i, :n + 1].numpy(), true_f(spec, p, n), atol=1e-6)
        assert torch.all(f[i, n + 1:] == f[i, n])  # padding repeats f(len), as stage 2's scorer does


def test_compare_scores_the_truth_zero_and_uniform_by_its_own_error():
    answers, texts = _batch(level=1)
    accuracy = decision_accuracy(answers, texts)
    specs = [Spec.from_answer(a) for a in answers]
    truth = [true_f(s, [accuracy[((12, 2, "graded", 0.0), j)] for j in range(2)], 13) for s in specs]
    exact = compare(truth, answers, accuracy)
    assert exact["mae_f"] == pytest.approx(0, abs=1e-12) and exact["mae_increment_decision"] == pytest.approx(0, abs=1e-12)
    assert exact["decision_share_net"] == pytest.approx(1.0) and exact["decision_share_true"] == pytest.approx(1.0)
    assert exact["decision_share_tokens"] == pytest.approx(2 / 13)
    uniform = compare([np.arange(14) / 13 for _ in specs], answers, accuracy)
    assert uniform["mae_f"] == pytest.approx(uniform["mae_f_uniform"])
    assert uniform["decision_share_net"] == pytest.approx(2 / 13)  # uniform weight: the decisions' share of tokens
    # noiseless graded k=2, equal p: the truth jumps by 1/2 at each decision, the uniform f by 1/13 per token
    assert uniform["mae_increment_decision"] == pytest.approx(0.5 - 1 / 13, abs=0.02)


def test_step_metrics_weight_share_on_decision_tokens():
    answers, texts = _batch(n=8, level=2)
    width = 17
    mask = torch.ones(8, width)
    on = torch.as_tensor(np.stack([decision_mask(Spec.from_answer(a), width) for a in answers])).float()
    uniform = step_metrics(answers, texts, torch.ones(8, width), mask)
    assert uniform["credit/decision_weight_share"] == pytest.approx(uniform["credit/decision_token_share"])
    assert uniform["credit/decision_token_share"] == pytest.approx(2 / 17)
    assert step_metrics(answers, texts, on * 5.0, mask)["credit/decision_weight_share"] == pytest.approx(1.0)


@pytest.mark.parametrize("changes,message", [
    ({"task_name": "arithmetic"}, "--importance oracle is the true f of --task_name credit"),
    ({"softmask": "none"}, "--importance oracle feeds the soft masks that read f"),
    ({"importance_net": "some/export"}, "--importance oracle reads no net: drop --importance_net"),
])
def test_oracle_source_refuses_what_it_cannot_serve(changes, message):
    validate(GRPOArgs(model_name="credit-tiny", task_name="credit", softmask="delta", importance="oracle"))
    args = GRPOArgs(**{"model_name": "credit-tiny", "task_name": "credit", "softmask": "delta",
                       "importance": "oracle", **changes})
    with pytest.raises(UserError, match=message):
        validate(args)


def test_the_judge_waits_for_its_minimum_of_heldout_prompts():
    """The same synthetic run leaves the fallback with the default minimum, never with one it cannot reach."""
    def first_judged(minimum: int) -> int | None:
        online = OnlineImportance(9, OnlineOptions(heldout_fraction=0.25, refit_iters=20, lr=0.05,
                                                   min_heldout_prompts=minimum), "cpu")
        rng = np.random.default_rng(0)
        for step in range(1, 21):
            _, metrics = _synthetic_step(online, step, rng, 3, 8)
            if not np.isnan(metrics["online/gain"]):
                return step
        return None

    early, late = first_judged(2), first_judged(4)
    assert early is not None and late is not None and early <= late
    assert first_judged(25) is None  # 24 prompts in all: 25 held-out ones never come


class RecordingBackend:
    def __init__(self) -> None:
        self.calls = []

    def generate(self, requests, params):
        self.calls.append((requests, params))
        return [Completion([1, 2], "stop") for _ in requests]


class Tokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["0" for _ in ids]


def test_sampled_evaluation_seeds_each_prompt_by_its_id():
    rows = [{"prompt_id": 500000 + i, "level": 0, "question": "2+2", "answer": "4", "task_name": "arithmetic"}
            for i in range(3)]
    prompts = [("2+2", [5, 6]) for _ in rows]
    backend = RecordingBackend()
    score_prompts(backend, Tokenizer(), rows, prompts, 4, temperature=1.0)
    score_prompts(backend, Tokenizer(), rows, prompts, 4)
    (sampled, sampled_params), (greedy, greedy_params) = backend.calls
    assert sampled_params.temperature == 1.0 and greedy_params.temperature == 0.0
    assert [r.seed for r in sampled] == [500000, 500001, 500002]  # every arm of a study draws the same
