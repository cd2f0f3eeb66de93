"""One whole GRPO step against TRL 1.16's own GRPOTrainer, on the same sampled tokens, EOS included.

TRL's trainer is built on the tiny model with TRL-style reward functions (one async, some returning
None, so that some rows get no reward at all) and a generate() that returns fixed token ids,
with junk after the first EOS that TRL's own mask must cut. Our pipeline gets the same tokens, up
to and including that EOS, from a stub backend, on the same dataset loaded through
``--task_name PATH``. Both must agree on prompts, masks, per-function rewards, advantages,
log-probs, loss, gradients and the reward functions' logged metrics.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import rewards
from pipeline.generation.base import Completion, SamplingParams
from pipeline.grpo.advantages import group_advantages
from pipeline.grpo.logprobs import completion_logprobs
from pipeline.grpo.losses import compute_policy_loss
from pipeline.grpo.rollout import collect
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.prompting import render_prompt
from pipeline.tasks import build_rows

G, T, TEMPERATURE = 4, 6, 0.7
MARK = 7  # a completion starting with this token gets None from every reward function
QUESTIONS = ["Calculate 12 + 7.", "Calculate 1 + 2 + 3.", "Calculate 4 * 5 - 1.", "Calculate 9."]
SOLUTIONS = ["19", "6", "19", "9"]
# rows with no reward: 2 of group 0, 3 of group 1 (one reward left: no std), none of group 2, all of group 3
UNSCORED = {0, 1, 4, 5, 6, 12, 13, 14, 15}
EOS_AT = {0: 2, 3: 0, 5: 4, 9: 1, 10: 5, 11: 3}  # others run to T tokens without EOS (truncated)


def _content(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def text_length(completions, completion_ids, **kwargs):
    """TRL docs style: a reward on the completion's text."""
    return [None if ids[0] == MARK else len(_content(c)) / 10 for c, ids in zip(completions, completion_ids, strict=True)]


def token_parity(completion_ids, **kwargs):
    """A reward on the token ids, None on odd first tokens as well."""
    return [None if ids[0] == MARK or ids[0] % 2 else float(len(ids)) for ids in completion_ids]


async def solution_overlap(completions, solution, completion_ids, trainer_state, log_metric, **kwargs):
    """Async, reads the dataset's ``solution`` column, logs a metric and reads the trainer state."""
    await asyncio.sleep(0)
    values = [None if ids[0] == MARK else float(sum(ch in _content(c) for ch in sol)) + trainer_state.global_step
              for c, sol, ids in zip(completions, solution, completion_ids, strict=True)]
    log_metric("scored_share", sum(v is not None for v in values) / len(values))
    return values


FUNCTIONS = {"text_length": text_length, "token_parity": token_parity, "solution_overlap": solution_overlap}
WEIGHTS = {"text_length": 1.0, "token_parity": 0.5, "solution_overlap": 2.0}


def fixed_tokens(eos: int) -> torch.Tensor:
    """(B, T) sampled tokens: ordinary ids, an EOS where EOS_AT says, junk after it, MARK on unscored rows."""
    tokens = torch.randint(10, 250, (len(QUESTIONS) * G, T), generator=torch.Generator().manual_seed(0))
    for row in UNSCORED:
        tokens[row, 0] = MARK
    for row, position in EOS_AT.items():
        tokens[row, position] = eos
    return tokens


class FixedBackend:
    """Returns the fixed tokens of each request, cut after the first EOS, as a generation backend does."""

    def __init__(self, tokens: torch.Tensor, eos: int):
        self.tokens, self.eos = tokens, eos

    def generate(self, requests, params: SamplingParams) -> list[Completion]:
        assert len(requests) == len(self.tokens)
        out = []
        for ids in self.tokens.tolist():
            if self.eos in ids:
                out.append(Completion(ids[:ids.index(self.eos) + 1], "stop"))
            else:
                out.append(Completion(ids, "length"))
        return out

    def sync_weights(self, model) -> None:
        pass


def trl_dataset(layout: str) -> list[dict]:
    prompt = (lambda q: [{"role": "user", "content": q}]) if layout == "conversational" else (lambda q: f"Q: {q}\nA:")
    return [{"prompt": prompt(q), "solution": s} for q, s in zip(QUESTIONS, SOLUTIONS, strict=True)]


@pytest.fixture(params=["conversational", "text"])
def step(request, tiny_model_dir, tmp_path, monkeypatch):
    """(TRL's outputs, ours) for one step on the same tokens."""
    layout = request.param
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokens = fixed_tokens(tokenizer.eos_token_id)

    # ---- TRL
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(tokens), num_generations=G,
                        max_completion_length=T, temperature=TEMPERATURE, use_cpu=True, report_to="none", beta=0.0,
                        loss_type="dapo", scale_rewards="group", reward_weights=list(WEIGHTS.values()), bf16=False)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=list(FUNCTIONS.values()), args=config,
                          train_dataset=Dataset.from_list(trl_dataset(layout)), processing_class=tokenizer)
    trainer.model.generate = lambda input_ids, **_: torch.cat([input_ids, tokens], dim=1)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets
    inputs = [row for row in trl_dataset(layout) for _ in range(G)]
    trl_out = trainer._generate_and_score_completions(inputs)
    ids = torch.cat([trl_out["prompt_ids"], trl_out["completion_ids"]], dim=1)
    mask = torch.cat([trl_out["prompt_mask"], trl_out["completion_mask"]], dim=1)
    trl_out["logps"], _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)
    trl_out["loss"] = trainer.compute_loss(trainer.model, trl_out)
    trl_out["loss"].backward()
    trl_out["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trl_out["rewards_per_func"] = {name: np.array(trainer._logs["rewards"][fn.__name__], dtype=np.float64)
                                   for name, fn in FUNCTIONS.items()}
    trl_out["metrics"] = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ---- ours, on the same dataset file
    path = tmp_path / "trl_layout.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in trl_dataset(layout)))
    rows = build_rows(str(path), len(QUESTIONS), [0])
    for name, fn in FUNCTIONS.items():
        monkeypatch.setitem(rewards.REWARDS, name, fn)
    exp = collect(FixedBackend(tokens, tokenizer.eos_token_id), tokenizer, rows, [render_prompt(tokenizer, row) for row in rows], G,
                  SamplingParams(T, TEMPERATURE), WEIGHTS, seed=0, step=0)
    model = load_causal_lm(str(tiny_model_dir)).train()
    advantages = group_advantages(torch.as_tensor(exp.rewards, dtype=torch.float32), G, "group")
    logps, _ = completion_logprobs(model, exp.input_ids, exp.attention_mask, exp.completion_len, TEMPERATURE)
    loss, _ = compute_policy_loss("dapo", logps, None, advantages, exp.completion_mask, max_completion_length=T,
                                  num_items_in_batch=exp.completion_mask.sum())
    loss.backward()
    ours = {"exp": exp, "eos": tokenizer.eos_token_id, "advantages": advantages, "logps": logps, "loss": loss,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return trl_out, ours


def test_same_prompts_tokens_and_masks(step):
    trl_out, ours = step
    exp = ours["exp"]
    width = trl_out["prompt_ids"].size(1)
    assert torch.equal(exp.input_ids[:, :width], trl_out["prompt_ids"])
    assert torch.equal(exp.attention_mask[:, :width], trl_out["prompt_mask"])
    assert torch.equal(exp.completion_mask.long(), trl_out["completion_mask"])
    kept = trl_out["completion_mask"].bool()
    assert torch.equal(exp.input_ids[:, width:][kept], trl_out["completion_ids"][kept])
    # the EOS is a completion token, with its mask, in both
    for row, position in EOS_AT.items():
        assert trl_out["completion_mask"][row].sum() == position + 1
        assert trl_out["completion_ids"][row, position] == exp.input_ids[row, width + position] == ours["eos"]
    assert exp.truncated.tolist() == [row not in EOS_AT for row in range(len(exp.truncated))]


def test_same_rewards_and_advantages_with_unscored_rows(step):
    trl_out, ours = step
    exp = ours["exp"]
    for name in FUNCTIONS:
        np.testing.assert_allclose(exp.per_function[name], trl_out["rewards_per_func"][name], rtol=1e-6)
    assert set(np.flatnonzero(np.isnan(exp.rewards))) == UNSCORED
    torch.testing.assert_close(ours["advantages"], trl_out["advantages"], rtol=1e-5, atol=1e-6)
    advantages = ours["advantages"].view(-1, G)
    assert (advantages[1] == 0).all() and (advantages[3] == 0).all()  # one reward left / none left
    assert advantages[0].ne(0).sum() == 2 and advantages[2].ne(0).all()
    assert np.nanmean(exp.rewards) == pytest.approx(trl_out["metrics"]["reward"], rel=1e-6)
    assert exp.reward_metrics["scored_share"] == pytest.approx(trl_out["metrics"]["scored_share"])


def test_same_logprobs_loss_and_gradients(step):
    trl_out, ours = step
    mask = trl_out["completion_mask"].bool()
    torch.testing.assert_close(ours["logps"][mask], trl_out["logps"][mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss"], trl_out["loss"], rtol=1e-5, atol=1e-7)
    assert ours["loss"].abs() > 1e-4, "the step must carry a gradient"
    for name, grad in trl_out["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
