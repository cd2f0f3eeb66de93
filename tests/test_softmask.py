import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trl.trainer.grpo_trainer import GRPOTrainer

from pipeline.grpo.softmask import (
    SOFTMASKS,
    UNSCALED,
    finalize,
    gather_across_ranks,
    high_entropy_mask,
    soft_mask_weights,
    weight_stats,
)

# Row 0: f = [0, 0, .5, .5, 1], all 4 tokens valid. Row 1: 2 valid tokens; f past them is junk that must not leak.
F = torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.25, 0.75, 0.1, 0.9]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def test_delta_weights_by_hand() -> None:
    # raw row 0: [0, .5, 0, .5] (mass 1 over 4 tokens); row 1: [.25, .5] (mass .75 over 2 tokens)
    weights = soft_mask_weights("delta", MASK, 1.0, f=F)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 2.0, 0.0, 2.0], [2 / 3, 4 / 3, 0.0, 0.0]]))
    half = soft_mask_weights("delta", MASK, 0.5, f=F)
    torch.testing.assert_close(half, torch.tensor([[0.5, 1.5, 0.5, 1.5], [5 / 6, 7 / 6, 0.0, 0.0]]))


def test_variance_weights_by_hand() -> None:
    # raw = 1 - f(t): row 0 [1, 1, .5, .5] (mass 3); row 1 [1, .75] (mass 1.75)
    weights = soft_mask_weights("variance", MASK, 1.0, f=F)
    expected = torch.tensor([[4 / 3, 4 / 3, 2 / 3, 2 / 3], [2 / 1.75, 1.5 / 1.75, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)


def test_flat_f_falls_back_to_uniform() -> None:
    weights = soft_mask_weights("delta", MASK, 1.0, f=torch.full((2, 5), 0.3))
    assert torch.equal(weights, MASK)


@pytest.mark.parametrize("mode", sorted(SOFTMASKS))
def test_strength_zero_is_uniform_and_none_is_the_mask(mode: str) -> None:
    entropies = torch.rand(2, 4)
    assert torch.equal(soft_mask_weights(mode, MASK, 0.0, f=F, entropies=entropies), MASK)
    assert torch.equal(soft_mask_weights("none", MASK, 0.7), MASK)


@pytest.mark.parametrize("mode", sorted(set(SOFTMASKS) - UNSCALED))
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_mean_one_per_completion_and_zero_on_padding(mode: str, strength: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b, t = 8, 30
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t) < lengths.unsqueeze(1)).float()
    f = torch.cat([torch.zeros(b, 1), torch.rand(b, t, generator=gen).cumsum(-1) / t], dim=1).clamp(max=0.99)
    entropies = torch.rand(b, t, generator=gen)
    weights = soft_mask_weights(mode, mask, strength, f=f, entropies=entropies)
    assert (weights >= 0).all()
    assert (weights[mask == 0] == 0).all()
    torch.testing.assert_close((weights * mask).sum(-1) / lengths, torch.ones(b))


def trl_high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, threshold: float,
                          gather=lambda x: x) -> torch.Tensor:  # fmt: skip
    """TRL's method on a stand-in trainer; ``gather`` plays accelerate's gather of the padded values."""
    accelerator = SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=gather)
    return GRPOTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accelerator), entropies, mask, threshold)


def ragged_batch(seed: int, lengths: list[int], width: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).float()
    return torch.rand(len(lengths), width, generator=gen) * 4, mask


@pytest.mark.parametrize("quantile", [0.2, 0.05, 0.5, 1.0])
def test_entropy_is_trls_mask_as_it_is(quantile: float) -> None:
    entropies, mask = ragged_batch(1, [30, 25, 20, 15, 10, 0])  # 100 valid tokens
    kept = soft_mask_weights("entropy", mask, 1.0, entropies=entropies, entropy_quantile=quantile)
    assert torch.equal(kept, trl_high_entropy_mask(entropies, mask, 1 - quantile).float())
    assert kept.sum().item() == round(100 * quantile)
    dropped = mask.bool() & ~kept.bool()
    if dropped.any():
        assert entropies[kept.bool()].min() > entropies[dropped].max()
    if quantile == 0.05:
        assert (kept.sum(-1)[:5] == 0).any(), "a completion with no kept token keeps weight 0, as in TRL"

    rescaled = soft_mask_weights("entropy_rescaled", mask, 1.0, entropies=entropies, entropy_quantile=quantile)
    for row in range(5):  # the rescaled variant: kept tokens share the completion's mass; none kept: uniform
        n_kept, n = kept[row].sum(), mask[row].sum()
        expected = kept[row] * n / n_kept if n_kept > 0 else mask[row]
        torch.testing.assert_close(rescaled[row], expected)
    half = soft_mask_weights("entropy", mask, 0.5, entropies=entropies, entropy_quantile=quantile)
    torch.testing.assert_close(half, (0.5 * kept + 0.5) * mask)


def test_entropy_quantile_spans_every_ranks_tokens() -> None:
    """Three ranks with different token counts (one with none) and entropy levels: each keeps what TRL keeps."""
    (e0, m0), (e1, m1) = ragged_batch(2, [30, 7, 12]), ragged_batch(3, [3, 28])
    ranks = [(e0, m0), (e1 + 2.0, m1), ragged_batch(4, [0, 0])]  # rank 1 is the more uncertain one
    padded = [e[m.bool()] for e, m in ranks]
    width = max(len(p) for p in padded)
    everything = torch.cat([torch.cat([p, torch.full((width - len(p),), -1e9)]) for p in padded])
    pooled = torch.cat(padded)
    for entropies, mask in ranks:
        ours = high_entropy_mask(entropies, mask, 0.2, gather=lambda local: pooled)
        theirs = trl_high_entropy_mask(entropies, mask, 0.8, gather=lambda local: everything)
        assert torch.equal(ours, theirs.float())
        local_only = high_entropy_mask(entropies, mask, 0.2, gather=lambda local: local)
        if mask.any():
            assert not torch.equal(ours, local_only), "the rank's own quantile would keep other tokens"
    assert sum(high_entropy_mask(e, m, 0.2, gather=lambda local: pooled).sum() for e, m in ranks) == round(
        0.2 * len(pooled))


def _gather_on_rank(rank: int, port: int, values: list[list[float]], out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(values))
    try:
        out[rank] = gather_across_ranks(torch.tensor(values[rank])).tolist()
    finally:
        dist.destroy_process_group()


def test_gather_across_ranks_over_gloo() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    values = [[0.5, 2.0, 1.0], [], [3.0]]
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_gather_on_rank, args=(port, values, out), nprocs=3, start_method="spawn")
    assert [out[r] for r in range(3)] == [[0.5, 2.0, 1.0, 3.0]] * 3
    assert torch.equal(gather_across_ranks(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))  # not distributed


def test_finalize_ignores_gradients_and_checks_strength() -> None:
    raw = torch.rand(2, 4, requires_grad=True)
    assert not finalize(raw, MASK, 1.0).requires_grad
    with pytest.raises(ValueError, match="strength"):
        finalize(raw, MASK, 1.5)


def test_weight_stats_by_hand() -> None:
    weights = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    stats = weight_stats(weights, mask)
    # top 20%: ceil(0.8) = 1 token of row 0 holds 2/4; 1 token of row 1 holds 1/5
    assert stats == pytest.approx({"mean": 1.0, "max": 2.0, "top20_mass": (0.5 + 0.2) / 2})


def test_rejects_missing_inputs() -> None:
    with pytest.raises(ValueError, match="unknown soft mask"):
        soft_mask_weights("random", MASK)
    with pytest.raises(ValueError, match=r"needs f of shape \(B, T \+ 1\)"):
        soft_mask_weights("delta", MASK, f=F[:, :4])
    with pytest.raises(ValueError, match="entropies"):
        soft_mask_weights("entropy", MASK)
