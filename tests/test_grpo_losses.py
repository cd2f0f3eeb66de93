"""Policy losses against TRL 1.16's GRPOTrainer._compute_loss as the oracle."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from pipeline.grpo.losses import POLICY_LOSSES, compute_policy_loss, mask_truncated_completions
from pipeline.grpo.softmask import soft_mask_weights

B, T = 6, 9
LENGTHS = [9, 4, 1, 0, 7, 9]  # one empty completion (e.g. masked as truncated)
ORACLE_METRICS = {
    "grpo": ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"],
    "cispo": ["cispo_clip_ratio"],
}


class SingleProcess:
    """The accelerator calls _compute_loss makes, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    def pad_across_processes(self, x: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return x


def trl_loss(logps, old_logps, advantages, mask, *, loss_type, beta=0.0, ref_logps=None, epsilon_low=0.2,
             epsilon_high=0.2, importance_sampling_level="token", num_items_in_batch=None, entropies=None,
             top_entropy_quantile=1.0):  # fmt: skip
    """TRL's loss on fixed log-probs: the unbound method with a stand-in trainer holding what it reads."""
    entropies = torch.zeros_like(logps) if entropies is None else entropies
    trainer = SimpleNamespace(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=T + 3,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None,
        aux_loss_enabled=False,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=SingleProcess(),
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
    )
    trainer.get_high_entropy_mask = lambda *args: GRPOTrainer.get_high_entropy_mask(trainer, *args)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch,
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    return {
        "logps": logps,
        "old_logps": logps + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "ref_logps": logps + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(B, generator=gen, dtype=torch.float64),
        "mask": (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)).double(),
    }


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilons", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trl(loss_type: str, beta: float, epsilons: tuple, on_policy: bool, level: str) -> None:
    batch = make_batch()
    epsilon_low, epsilon_high = epsilons
    if loss_type == "cispo":
        epsilon_high = 1.1  # cispo's cap on the ratio itself, low enough to bite
    old_logps = None if on_policy else batch["old_logps"]
    ref_logps = batch["ref_logps"] if beta else None
    num_items = batch["mask"].sum() * 2.5  # as if other ranks held more tokens
    kwargs = dict(
        beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, importance_sampling_level=level
    )

    ours_logps = batch["logps"].clone().requires_grad_()
    ours, metrics = compute_policy_loss(
        loss_type, ours_logps, old_logps, batch["advantages"], batch["mask"], ref_logps=ref_logps,
        max_completion_length=T + 3, num_items_in_batch=num_items, **kwargs,
    )  # fmt: skip
    trl_logps = batch["logps"].clone().requires_grad_()
    expected, trl_metrics = trl_loss(
        trl_logps, old_logps, batch["advantages"], batch["mask"], loss_type=loss_type, ref_logps=ref_logps,
        num_items_in_batch=num_items, **kwargs,
    )  # fmt: skip

    assert abs(ours.item() - expected.item()) < 1e-6
    assert ours.abs().item() > 1e-3  # a real number, not a degenerate zero
    ours.backward()
    expected.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, rtol=0, atol=1e-9)
    names = ORACLE_METRICS.get(loss_type, ORACLE_METRICS["grpo"]) + (["kl"] if beta else [])
    assert sorted(metrics) == sorted(names)
    for name in names:
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-9), name
    if not on_policy and level == "token" and loss_type != "cispo":
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the clipping branch was exercised


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_entropy_softmask_is_trls_top_entropy_quantile(loss_type: str, beta: float) -> None:
    """--softmask entropy --entropy_quantile q is TRL's top_entropy_quantile=q: same loss and gradients."""
    batch = make_batch(5)
    entropies = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    quantile = 0.2
    weights = soft_mask_weights("entropy", batch["mask"], 1.0, entropies=entropies, entropy_quantile=quantile)
    kept_rows = (weights.sum(-1) > 0).sum().item()
    assert 0 < kept_rows < (batch["mask"].sum(-1) > 0).sum().item(), "some completions keep no token"
    ref_logps = batch["ref_logps"] if beta else None
    epsilon_high = 1.1 if loss_type == "cispo" else 0.28
    grads, losses = [], []
    for side in ("ours", "trl"):
        logps = batch["logps"].clone().requires_grad_()
        if side == "ours":
            loss, _ = compute_policy_loss(
                loss_type, logps, batch["old_logps"], batch["advantages"], batch["mask"], weights,
                ref_logps=ref_logps, beta=beta, epsilon_high=epsilon_high, max_completion_length=T + 3,
            )  # fmt: skip
        else:
            loss, _ = trl_loss(
                logps, batch["old_logps"], batch["advantages"], batch["mask"], loss_type=loss_type, beta=beta,
                ref_logps=ref_logps, epsilon_high=epsilon_high, entropies=entropies, top_entropy_quantile=quantile,
            )  # fmt: skip
        loss.backward()
        losses.append(loss.item())
        grads.append(logps.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-12) and abs(losses[0]) > 1e-4
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    if beta == 0:  # dropped tokens get no gradient at all
        assert (grads[0][(weights == 0) & (batch["mask"] > 0)] == 0).all()


def test_dapo_defaults_to_local_token_count() -> None:
    batch = make_batch(1)
    args = (batch["logps"], batch["old_logps"], batch["advantages"], batch["mask"])
    ours, _ = compute_policy_loss("dapo", *args)
    expected, _ = trl_loss(*args, loss_type="dapo")
    assert abs(ours.item() - expected.item()) < 1e-9
    assert ours.item() == pytest.approx(compute_policy_loss("bnpo", *args)[0].item(), abs=1e-12)


def test_hand_computed_clipping() -> None:
    logps = torch.tensor([[-1.0, -1.0]])
    old = logps - torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    loss, metrics = compute_policy_loss("grpo", logps, old, torch.tensor([1.0]), torch.ones(1, 2))
    # A > 0: -min(1.5, 1.2) = -1.2 (clipped high) and -min(0.5, 0.8) = -0.5 (no gain from clipping low)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert metrics["clip_ratio/high_mean"].item() == 0.5
    assert metrics["clip_ratio/low_mean"].item() == 0.0


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_all_ones_weights_give_plain_loss_exactly(loss_type: str) -> None:
    batch = make_batch(2)
    args = (batch["logps"], batch["old_logps"], batch["advantages"], batch["mask"])
    kwargs = dict(ref_logps=batch["ref_logps"], beta=0.04, max_completion_length=T)
    plain, _ = compute_policy_loss(loss_type, *args, **kwargs)
    for weights in (torch.ones(B, T, dtype=torch.float64), batch["mask"]):
        weighted, _ = compute_policy_loss(loss_type, *args, weights, **kwargs)
        assert torch.equal(weighted, plain)


@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_weight_scales_each_tokens_gradient(loss_type: str) -> None:
    batch = make_batch(3)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    grads = []
    for token_weights in (None, weights):
        logps = batch["logps"].clone().requires_grad_()
        loss, _ = compute_policy_loss(
            loss_type, logps, batch["old_logps"], batch["advantages"], batch["mask"], token_weights,
            max_completion_length=T,
        )  # fmt: skip
        loss.backward()
        grads.append(logps.grad)
    plain, weighted = grads
    assert plain.abs().sum() > 0
    torch.testing.assert_close(weighted, weights * plain, rtol=1e-12, atol=1e-15)


def test_kl_term_is_not_weighted() -> None:
    batch = make_batch(4)
    args = (batch["logps"], batch["logps"], batch["advantages"] * 0, batch["mask"])
    kwargs = dict(ref_logps=batch["ref_logps"], beta=0.1)
    plain, _ = compute_policy_loss("bnpo", *args, **kwargs)
    weighted, _ = compute_policy_loss("bnpo", *args, torch.rand(B, T, dtype=torch.float64), **kwargs)
    assert plain.item() > 0
    assert weighted.item() == pytest.approx(plain.item(), abs=1e-12)


def test_mask_truncated_completions() -> None:
    mask = torch.ones(3, 4)
    out = mask_truncated_completions(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_rejects_bad_arguments() -> None:
    batch = make_batch()
    args = (batch["logps"], None, batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_policy_loss("ppo", *args)
    with pytest.raises(ValueError, match="max_completion_length"):
        compute_policy_loss("dr_grpo", *args)
    with pytest.raises(ValueError, match="ref_logps"):
        compute_policy_loss("grpo", *args, beta=0.1)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        compute_policy_loss("grpo", *args, importance_sampling_level="token_mean")
