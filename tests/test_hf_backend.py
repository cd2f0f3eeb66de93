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


def test_budget_and_finish_reason(backend):
    out = backend.generate([Request([5, 6], 3, 1), Request([5, 6], 7, 2)], SamplingParams(temperature=1.0))
    for completion, budget in zip(out, [3, 7], strict=True):
        assert len(completion.token_ids) <= budget
        assert completion.finish_reason == ("length" if len(completion.token_ids) == budget else "stop")


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
