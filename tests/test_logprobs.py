"""Chunked log-probs and entropies equal the full-vocabulary computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.grpo.logprobs import completion_logprobs, output_head
from tests.scale_batch import naive_logprobs, random_batch


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    """float64, so float32 rounding cannot hide an algebra slip behind the tolerance."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).train()


def _grads(model, logps, weights) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logps * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equal_to_the_full_vocabulary_computation(model, chunk_size, temperature):
    input_ids, attention, mask = random_batch(model.config.vocab_size)
    expected, expected_entropy = naive_logprobs(model, input_ids, attention, mask.size(1), temperature)
    logps, entropy = completion_logprobs(model, input_ids, attention, mask.size(1), temperature, with_entropy=True,
                                         chunk_size=chunk_size)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-6)
    assert not entropy.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 7, 0])
def test_same_gradients(model64, chunk_size):
    input_ids, attention, mask = random_batch(model64.config.vocab_size)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _grads(model64, naive_logprobs(model64, input_ids, attention, mask.size(1), 0.7)[0], weights)
    logps, _ = completion_logprobs(model64, input_ids, attention, mask.size(1), 0.7, chunk_size=chunk_size)
    for name, grad in _grads(model64, logps, weights).items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-9, msg=name)
    assert max(g.abs().max() for g in expected.values()) > 1e-3


def test_entropy_only_when_asked(model):
    input_ids, attention, mask = random_batch(model.config.vocab_size)
    logps, entropy = completion_logprobs(model, input_ids, attention, mask.size(1))
    assert entropy is None and logps.shape == mask.shape


def test_the_head_never_sees_more_than_a_chunk(model):
    """Forward and backward (recomputation) both run the head on at most ``chunk_size`` positions."""
    input_ids, attention, mask = random_batch(model.config.vocab_size, rows=8)
    head = output_head(model)
    seen: list[int] = []
    original = head.forward

    def spy(hidden):
        seen.append(hidden.shape[0])
        return original(hidden)

    head.forward = spy  # completion_logprobs runs whatever forward the head has, and puts it back
    try:
        logps, _ = completion_logprobs(model, input_ids, attention, mask.size(1), chunk_size=5)
        forward_calls = len(seen)
        logps.sum().backward()
    finally:
        del head.forward
    rows = mask.numel()
    assert forward_calls == -(-rows // 5), "one head call per chunk"
    assert len(seen) == 2 * forward_calls, "backward recomputes each chunk once"
    assert max(seen) <= 5
