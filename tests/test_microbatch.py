"""Micro-batches give the one-batch optimizer step: loss, metrics and every parameter's gradient, every loss type."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.grpo.losses import POLICY_LOSSES
from pipeline.grpo.microbatch import PolicyBatch, accumulate, micro_batches, score
from pipeline.grpo.softmask import soft_mask_weights
from tests.scale_batch import random_batch

ROWS = 6


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    """float64, so float32 rounding cannot hide an algebra slip behind the tolerance."""
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="64-true")
    model = fabric.setup(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).train())
    return fabric, model


def make_batch(vocab_size: int) -> PolicyBatch:
    input_ids, attention, mask = random_batch(vocab_size, rows=ROWS)
    gen = torch.Generator().manual_seed(2)
    mask = mask.double()
    noise = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    return PolicyBatch(input_ids, attention, mask, advantages=torch.randn(ROWS, generator=gen, dtype=torch.float64),
                       weights=torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 2 * mask,
                       old_logps=noise * 0.1, ref_logps=noise * 0.3)  # filled in below from the model


def _step(fabric, model, batch, loss_type, size, level="token", **kwargs):
    model.zero_grad(set_to_none=True)
    options = {"beta": 0.04 if batch.ref_logps is not None else 0.0, "importance_sampling_level": level, "epsilon_low": 0.2, "epsilon_high": 1.1 if loss_type == "cispo" else 0.28,
               "max_completion_length": batch.completion_len + 2,
               "num_items_in_batch": batch.completion_mask.sum()}
    result = accumulate(fabric, model, batch, loss_type, options, size, temperature=0.9, **kwargs)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return result, grads


def _assert_same(one, many):
    (r1, g1), (r2, g2) = one, many
    torch.testing.assert_close(r2.loss, r1.loss, rtol=0, atol=1e-9)
    assert r1.metrics.keys() == r2.metrics.keys() and "kl" in r1.metrics
    for name in r1.metrics:
        torch.testing.assert_close(r2.metrics[name], r1.metrics[name], rtol=0, atol=1e-9, msg=name)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=1e-9, msg=name)
    assert max(g.abs().max() for g in g1.values()) > 1e-4


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batches_equal_one_batch(setup, loss_type, size, level):
    fabric, model = setup
    batch = make_batch(model.config.vocab_size)
    logps, _ = score(model, batch, None, 0.9)
    batch.old_logps, batch.ref_logps = logps + batch.old_logps, logps + batch.ref_logps  # off-policy, KL > 0
    one = _step(fabric, model, batch, loss_type, None, level, with_entropy=True)
    many = _step(fabric, model, batch, loss_type, size, level, with_entropy=True)
    _assert_same(one, many)
    torch.testing.assert_close(many[0].entropies, one[0].entropies, rtol=0, atol=1e-9)
    assert one[0].metrics["kl"] > 0


@pytest.mark.parametrize("size", [1, 4])
def test_entropy_mask_uses_the_whole_batch(setup, size):
    """The entropy mask's quantile is over the whole batch, as with one micro-batch (an extra no-grad pass)."""
    fabric, model = setup
    batch = make_batch(model.config.vocab_size)
    batch.old_logps = batch.weights = None
    batch.ref_logps = score(model, batch, None, 0.9)[0] + batch.ref_logps

    def weights(entropies):
        return soft_mask_weights("entropy", batch.completion_mask, 1.0, entropies=entropies, entropy_quantile=0.3)

    one = _step(fabric, model, batch, "dapo", None, weights_from_entropies=weights)
    many = _step(fabric, model, batch, "dapo", size, weights_from_entropies=weights)
    _assert_same(one, many)
    torch.testing.assert_close(many[0].weights, one[0].weights, rtol=0, atol=0)
    assert 0 < (one[0].weights > 0).sum() < batch.completion_mask.sum()


def test_entropy_only_when_asked(setup):
    fabric, model = setup
    batch = make_batch(model.config.vocab_size)
    batch.old_logps = batch.ref_logps = None
    assert _step(fabric, model, batch, "dapo", 4, with_entropy=False)[0].entropies is None


def test_micro_batches_cover_every_row_once():
    assert micro_batches(6, 4) == [slice(0, 4), slice(4, 6)]
    assert micro_batches(6, None) == micro_batches(6, 0) == micro_batches(6, 9) == [slice(0, 6)]
    assert [s.stop - s.start for s in micro_batches(7, 2)] == [2, 2, 2, 1]
