"""credit-tiny: one token per symbol, the prompt's slot i WIDTH + 1 tokens before completion token i,
and (slow) a warm-up that lands where the task's truth assumes: decisions right ~40% of the time."""

import numpy as np
import pytest
import torch

from pipeline import credit_tiny
from pipeline.models import load_causal_lm, load_tokenizer, model_slug
from pipeline.prompting import render_prompt
from pipeline.tasks import build_rows
from pipeline.tasks.credit import WIDTH, Spec, decisions_right


def test_tokenizer_is_one_token_per_symbol():
    tokenizer = credit_tiny.build_tokenizer()
    row = build_rows("credit", 1, [3])[0]
    text, ids = render_prompt(tokenizer, row)
    assert len(ids) == WIDTH + 1 and text.endswith(credit_tiny.SEPARATOR)
    completion = "a 3 b c d 0"
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert len(completion_ids) == 6
    assert tokenizer.decode(completion_ids + [tokenizer.eos_token_id], skip_special_tokens=True) == completion


def test_ideal_targets_are_the_idealised_policy():
    tokenizer = credit_tiny.build_tokenizer()
    spec = Spec({1: "2"}, length=3, kind="binary", noise=0.0)
    target = credit_tiny.ideal_next(tokenizer, spec).numpy()
    vocab = tokenizer.get_vocab()
    assert target[0].sum() == pytest.approx(1) and target[0, vocab["a"]] == pytest.approx(0.25)
    decision = target[1] / credit_tiny.DECISION_WEIGHT
    assert decision[vocab["2"]] == pytest.approx(credit_tiny.WARMUP_P_RIGHT) and decision.sum() == pytest.approx(1)
    assert target[3, tokenizer.eos_token_id] == 1


def test_alias_resolves_to_the_cached_build(credit_tiny_cache, monkeypatch):
    monkeypatch.setenv("RVG_CACHE", str(credit_tiny_cache))
    assert load_tokenizer("credit-tiny").get_vocab() == credit_tiny.build_tokenizer().get_vocab()
    assert load_causal_lm("credit-tiny").config.num_hidden_layers == 2
    assert model_slug("credit-tiny") == "credit-tiny"


@pytest.mark.slow
def test_warmup_starts_between_zero_and_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RVG_CACHE", str(tmp_path))
    tokenizer, model = load_tokenizer("credit-tiny"), load_causal_lm("credit-tiny")
    rows = build_rows("credit", 200, [0, 1, 2, 3, 4])
    prompts = [render_prompt(tokenizer, row)[0] for row in rows]
    batch = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=WIDTH + 1, top_k=0)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    specs = [Spec.from_answer(r["answer"]) for r in rows]
    right = np.concatenate([decisions_right(t, s) for t, s in zip(texts, specs, strict=True)])
    assert 0.3 < right.mean() < 0.5
    assert np.mean([len(t.split()) == s.length for t, s in zip(texts, specs, strict=True)]) > 0.95
