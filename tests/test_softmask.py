from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from pipeline.grpo.softmask import SOFTMASKS, finalize, soft_mask_weights, weight_stats

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


@pytest.mark.parametrize("mode", sorted(SOFTMASKS))
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


def trl_high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    single_process = SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    return GRPOTrainer.get_high_entropy_mask(
        SimpleNamespace(accelerator=single_process), entropies, mask, threshold
    )


@pytest.mark.parametrize("quantile", [0.2, 0.05, 0.5, 1.0])
def test_entropy_keeps_the_top_quantile_like_trl(quantile: float) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([30, 25, 20, 15, 10, 0])  # 100 valid tokens
    mask = (torch.arange(30) < lengths.unsqueeze(1)).float()
    entropies = torch.rand(6, 30, generator=gen) * 4
    kept = SOFTMASKS["entropy"](mask, None, entropies, quantile)
    assert kept.sum().item() == round(100 * quantile)
    assert torch.equal(kept.bool(), trl_high_entropy_mask(entropies, mask, 1 - quantile))
    dropped = mask.bool() & ~kept.bool()
    if dropped.any():
        assert entropies[kept.bool()].min() > entropies[dropped].max()

    weights = soft_mask_weights("entropy", mask, 1.0, entropies=entropies, entropy_quantile=quantile)
    for row in range(5):  # kept tokens share the completion's mass; a row with none kept is uniform
        n_kept, n = kept[row].sum(), lengths[row]
        expected = kept[row] * n / n_kept if n_kept > 0 else mask[row]
        torch.testing.assert_close(weights[row], expected)


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
