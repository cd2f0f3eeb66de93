"""The transformers backend: per-request seeds make samples independent of batching, and exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.generation import HFBackend, Request, SamplingParams
from pipeline.generation.hf import PerRequestSampling
from pipeline.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), batch_size=4)


def test_sample_depends_on_its_seed_not_its_batch(backend):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    requests = [Request(p, 12, seed=100 + i) for i, p in enumerate(prompts)]
    together = backend.generate(requests, params)
    alone = [backend.generate([r], params)[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    other_seed = backend.generate([Request(prompts[0], 12, seed=999)], params)[0]
    assert other_seed.token_ids != together[0].token_ids


def test_budget_finish_reason_and_kept_stop_token(backend):
    """A stopped completion ends with its stop token (TRL keeps the first EOS); no other stop token inside."""
    requests = [Request([5, 6], budget, seed) for seed in range(12) for budget in (3, 7)]
    out = backend.generate(requests, SamplingParams(temperature=1.0))
    for completion, request in zip(out, requests, strict=True):
        tokens = completion.token_ids
        assert len(tokens) <= request.max_new_tokens
        assert not backend.stop_ids & set(tokens[:-1])
        if completion.finish_reason == "stop":
            assert tokens[-1] in backend.stop_ids
        else:
            assert completion.finish_reason == "length" and len(tokens) == request.max_new_tokens
            assert tokens[-1] not in backend.stop_ids
    assert {c.finish_reason for c in out} == {"stop", "length"}


def test_per_request_sampling_matches_softmax():
    """The per-row inverse-CDF draw follows softmax(logits / T), restricted to the top-p nucleus."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = []
    for seed in range(4000):
        proc = PerRequestSampling([seed], temperature=0.7, top_p=1.0)
        draws.append(int(proc(None, logits).argmax()))
    probs = torch.softmax(logits[0].double() / 0.7, -1).numpy()
    expected = probs / probs.sum() * len(draws)
    assert stats.chisquare(np.bincount(draws, minlength=4), expected).pvalue > 0.01
    nucleus = [int(PerRequestSampling([s], 1.0, top_p=0.5)(None, logits).argmax()) for s in range(500)]
    assert set(nucleus) == {0}  # p(token 0) = 0.64 >= 0.5: the nucleus is one token


def test_the_models_generation_config_does_not_change_samples(tiny_model_dir, tmp_path):
    """A checkpoint whose generation_config.json asks for penalties, top-k, min-p... samples like one without."""
    from transformers import GenerationConfig

    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    opinionated = load_causal_lm(str(tiny_model_dir))
    opinionated.generation_config = GenerationConfig(
        eos_token_id=model.generation_config.eos_token_id, do_sample=True, temperature=0.3, top_k=2, top_p=0.5,
        min_p=0.4, repetition_penalty=1.8, no_repeat_ngram_size=1, min_new_tokens=12, suppress_tokens=[5, 6, 7],
        bad_words_ids=[[8]])
    requests = [Request([5, 6, 7], 12, seed=s) for s in range(6)]
    for params in (SamplingParams(max_new_tokens=12, temperature=1.0), SamplingParams(max_new_tokens=12, temperature=0.0)):
        plain = HFBackend(model, tokenizer).generate(requests, params)
        other = HFBackend(opinionated, tokenizer).generate(requests, params)
        assert [c.token_ids for c in other] == [c.token_ids for c in plain]
    assert opinionated.generation_config.repetition_penalty == 1.8, "the model's own config is left as it was"
