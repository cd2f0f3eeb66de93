"""The likelihoods (Gaussian against scipy, Bernoulli as a distribution), the constant baseline, the metrics."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pipeline.errors import UserError
from pipeline.importance.loss import (
    F_MAX,
    LIKELIHOODS,
    OUTLIER_SHARE,
    best_constant_f,
    is_binary,
    pair_nll,
    resolve_likelihood,
    robust,
    validation_loss,
)
from pipeline.importance.metrics import N_BINS, ValidationStats, bootstrap_gain_ci


def test_pair_nll_is_the_bivariate_normal_log_density():
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = rng.uniform(-0.95, 0.99)
        z1, z2 = rng.normal(scale=2.0, size=2)
        expected = -multivariate_normal.logpdf([z1, z2], mean=[0, 0], cov=[[1, f], [f, 1]])
        got = pair_nll(torch.tensor(f, dtype=torch.float64), torch.tensor(z1), torch.tensor(z2)).item()
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_pair_nll_on_raw_rewards_differs_by_the_jacobian():
    """-log p(R1, R2 | m, v, f) = pair_nll(f, z1, z2) + log v: the section-1 model in reward units."""
    rng = np.random.default_rng(1)
    m, v = rng.normal(size=50), rng.uniform(0.01, 5, size=50)
    f = rng.uniform(0, F_MAX, size=50)
    r = m[:, None] + np.sqrt(v)[:, None] * rng.normal(size=(50, 2))
    z = (r - m[:, None]) / np.sqrt(v)[:, None]
    got = pair_nll(torch.tensor(f), torch.tensor(z[:, 0]), torch.tensor(z[:, 1])).numpy() + np.log(v)
    expected = [-multivariate_normal.logpdf(r[i], mean=[m[i], m[i]], cov=v[i] * np.array([[1, f[i]], [f[i], 1]]))
                for i in range(50)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_pair_nll_is_finite_with_finite_gradients_at_and_beyond_f_max():
    f = torch.tensor([0.0, 0.5, F_MAX, 1.0, 1.5], requires_grad=True)
    z1 = torch.tensor([3.0, -4.0, 5.0, 5.0, 1.0])
    z2 = torch.tensor([3.0, 4.0, 5.0, -5.0, 1.0])
    loss = pair_nll(f, z1, z2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(f.grad).all()
    # exact ties at F_MAX: the log-determinant term, log(1 - F_MAX^2) / 2, bounds how far a tie pulls the loss down
    assert loss[2].item() == pytest.approx(math.log(2 * math.pi) + 0.5 * math.log1p(-F_MAX**2) + 25 / (1 + F_MAX),
                                           rel=1e-4)
    assert loss[3].item() - loss[2].item() == pytest.approx(100 / (4 * (1 - F_MAX)) - 25 / (1 + F_MAX), rel=1e-3)


def _z(z: np.ndarray) -> dict[str, torch.Tensor]:
    return {"z1": torch.tensor(z[:, 0]), "z2": torch.tensor(z[:, 1])}


@pytest.mark.parametrize("true_f", [-0.3, 0.0, 0.3, 0.7, 0.999])
def test_best_constant_f_is_the_grid_minimum(true_f):
    rng = np.random.default_rng(2)
    z = rng.multivariate_normal([0, 0], [[1, true_f], [true_f, 1]], size=4000)
    got = best_constant_f("gaussian", _z(z))
    grid = torch.linspace(0, F_MAX, 2001, dtype=torch.float64)
    losses = pair_nll(grid[:, None], torch.tensor(z[:, 0]), torch.tensor(z[:, 1])).mean(1)
    assert got == pytest.approx(float(grid[losses.argmin()]), abs=float(grid[1]) + 1e-9)
    best = pair_nll(torch.tensor(got, dtype=torch.float64), torch.tensor(z[:, 0]), torch.tensor(z[:, 1])).mean()
    assert best <= losses.min() + 1e-12
    assert got == pytest.approx(max(true_f, 0.0), abs=0.05)  # negative correlations floor at 0


def test_moment_constant_is_the_clipped_mean_of_z1_z2():
    z = np.random.default_rng(3).normal(size=(500, 2)) + 0.5
    assert best_constant_f("moment", _z(z)) == pytest.approx(float(np.mean(z[:, 0] * z[:, 1])), abs=1e-6)
    assert best_constant_f("moment", _z(-np.abs(z) * np.array([1, -1]))) == 0.0


@pytest.mark.parametrize(("f", "p"), [(0.0, 0.3), (0.4, 0.5), (0.9, 0.8)])
def test_bernoulli_is_a_distribution_with_correlation_f(f, p):
    """The four outcomes' probabilities sum to 1, each sister succeeds w.p. p, and Corr(R1, R2) = f."""
    outcomes = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    targets = {"r1": outcomes[:, 0], "r2": outcomes[:, 1], "p": torch.full((4,), p, dtype=torch.float64)}
    prob = torch.exp(-LIKELIHOODS["bernoulli"](torch.full((4,), f, dtype=torch.float64), targets))
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(prob[:2].sum()) == pytest.approx(p, abs=1e-12)  # P(R1 = 1)
    z = (outcomes - p) / math.sqrt(p * (1 - p))
    assert float((prob * z[:, 0] * z[:, 1]).sum()) == pytest.approx(f, abs=1e-12)  # E[z1 z2] = f


def test_bernoulli_constant_recovers_the_simulated_correlation():
    rng = np.random.default_rng(4)
    p, f, n = 0.35, 0.6, 20000
    shared = rng.random(n) < f  # with probability f the sisters copy one draw, else draw independently
    first = rng.random(n) < p
    second = np.where(shared, first, rng.random(n) < p)
    targets = {"r1": torch.tensor(first, dtype=torch.float64), "r2": torch.tensor(second, dtype=torch.float64),
               "p": torch.full((n,), p, dtype=torch.float64)}
    assert best_constant_f("bernoulli", targets) == pytest.approx(f, abs=0.03)


def test_likelihood_choice():
    assert is_binary(np.array([0.0, 1.0, np.nan]), np.array([1.0]))
    assert not is_binary(np.array([0.0, 0.5]))
    assert resolve_likelihood("auto", [True, True], "reward") == "bernoulli"
    assert resolve_likelihood("auto", [False, False], "reward") == "gaussian"
    assert resolve_likelihood("auto", [True, False], "reward") == "bernoulli+gaussian"
    assert resolve_likelihood("moment", [True], "reward") == "moment"
    with pytest.raises(UserError, match="--likelihood bernoulli needs a 0/1 reward column, but 'reward_x'"):
        resolve_likelihood("bernoulli", [True, False], "reward_x")


def test_bernoulli_or_gaussian_scores_each_pair_by_its_prompts_rewards():
    """Pairs of 0/1 prompts get the Bernoulli's loss, the others the Gaussian's, gradients included; a graded
    pair whose p is outside (0, 1) (a NaN under the Bernoulli) leaves no NaN anywhere."""
    targets = {"z1": torch.tensor([1.0, -1.0, 0.3, 0.7]), "z2": torch.tensor([1.0, 1.0, -0.2, 0.7]),
               "r1": torch.tensor([1.0, 0.0, 2.5, 1.9]), "r2": torch.tensor([1.0, 1.0, -1.0, 1.9]),
               "p": torch.tensor([0.5, 0.25, 1.5, 1.5]), "binary": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    f = torch.tensor([0.3, 0.6, 0.2, 0.9], requires_grad=True)
    loss = LIKELIHOODS["bernoulli+gaussian"](f, targets)
    loss.sum().backward()
    rows = {k: v[:2] for k, v in targets.items()}
    assert torch.allclose(loss[:2], LIKELIHOODS["bernoulli"](f[:2], rows))
    assert torch.allclose(loss[2:], LIKELIHOODS["gaussian"](f[2:], {k: v[2:] for k, v in targets.items()}))
    assert torch.isfinite(f.grad).all()
    assert 0 < best_constant_f("bernoulli+gaussian", targets) < F_MAX  # a scalar f is spread over the pairs


def _mixture_nll(f: float, z1: float, z2: float, share: float = OUTLIER_SHARE) -> float:
    density = [multivariate_normal.pdf([z1, z2], mean=[0, 0], cov=[[1, c], [c, 1]]) for c in (f, 0.0)]
    return -math.log((1 - share) * density[0] + share * density[1])


def test_robust_gaussian_is_a_mixture_with_independent_sisters_and_bounds_a_wrong_pair():
    rng = np.random.default_rng(3)
    f = torch.tensor(rng.uniform(0, F_MAX, 300))
    z = rng.normal(scale=1.5, size=(300, 2))
    got = robust(LIKELIHOODS["gaussian"])(f, _z(z)).numpy()
    np.testing.assert_allclose(got, [_mixture_nll(f[i].item(), *z[i]) for i in range(300)], rtol=1e-9)
    # at f = 0 nothing changes; anywhere, a pair costs at most log(1 / share) more than at f = 0
    at_zero = LIKELIHOODS["gaussian"](torch.zeros(300, dtype=torch.float64), _z(z)).numpy()
    np.testing.assert_allclose(robust(LIKELIHOODS["gaussian"])(torch.zeros(300, dtype=torch.float64), _z(z)).numpy(),
                               at_zero, rtol=1e-12)
    assert (got <= at_zero + math.log(1 / OUTLIER_SHARE) + 1e-9).all()
    # sisters 3 apart at the cap: the exact likelihood charges about 9 / (4 (1 - F_MAX)) = 225 nats, the robust one < 9
    wrong = _z(np.array([[1.5, -1.5]]))
    assert LIKELIHOODS["gaussian"](torch.tensor([F_MAX]), wrong).item() > 220
    assert robust(LIKELIHOODS["gaussian"])(torch.tensor([F_MAX]), wrong).item() < 9


@pytest.mark.parametrize("f", [0.0, 0.3, F_MAX])
def test_robust_bernoulli_is_the_bernoulli_at_a_shrunk_f(f):
    """The Bernoulli's probabilities are linear in f, so mixing in independence is shrinking f by the share."""
    targets = {"r1": torch.tensor([1.0, 1.0, 0.0, 0.0]), "r2": torch.tensor([1.0, 0.0, 1.0, 0.0]),
               "p": torch.full((4,), 0.3, dtype=torch.float64)}
    shrunk = torch.full((4,), (1 - OUTLIER_SHARE) * f, dtype=torch.float64)
    got = robust(LIKELIHOODS["bernoulli"])(torch.full((4,), f, dtype=torch.float64), targets)
    assert torch.allclose(got, LIKELIHOODS["bernoulli"](shrunk, targets), rtol=1e-12)


def test_validation_loss_is_robust_for_the_likelihoods_and_the_moment_loss_as_it_is():
    assert validation_loss("moment") is LIKELIHOODS["moment"]
    targets = {"z1": torch.tensor([1.0, -1.0]), "z2": torch.tensor([1.0, 1.0]), "r1": torch.tensor([1.0, 0.0]),
               "r2": torch.tensor([1.0, 1.0]), "p": torch.tensor([0.5, 0.5]), "binary": torch.tensor([0.0, 1.0])}
    f = torch.tensor([0.9, 0.9])
    for name in ("gaussian", "bernoulli", "bernoulli+gaussian"):
        assert torch.allclose(validation_loss(name)(f, targets), robust(LIKELIHOODS[name])(f, targets))


def test_validation_keeps_the_net_that_is_right_on_fifty_prompts_over_one_wrong_near_the_cap_on_one():
    """The credit task's failure (docs/credit.md): a net right on 50 prompts but at the cap on a prompt whose
    sisters then disagree, against a vaguer net. The exact likelihood prefers the vague net, the robust one not."""
    rng = np.random.default_rng(4)
    true_f = rng.uniform(0.05, 0.95, 500)
    z1 = rng.normal(size=500)
    z2 = true_f * z1 + np.sqrt(1 - true_f**2) * rng.normal(size=500)
    z = np.concatenate([np.stack([z1, z2], 1), [[1.0, -1.0]] * 6])
    sharp = torch.tensor(np.concatenate([true_f, [F_MAX] * 6]))
    vague = torch.full((506,), 0.5, dtype=torch.float64)
    exact, robust_loss = LIKELIHOODS["gaussian"], validation_loss("gaussian")
    assert exact(sharp, _z(z)).mean() > exact(vague, _z(z)).mean()
    assert robust_loss(sharp, _z(z)).mean() < robust_loss(vague, _z(z)).mean()


def _batch(f, z1, z2, split, prompt_index, relative) -> dict[str, torch.Tensor]:
    z1, z2 = torch.tensor(z1), torch.tensor(z2)
    return {"z1": z1, "z2": z2, "r1": z1, "r2": z2, "p": torch.full_like(z1, 0.5),
            "binary": torch.zeros_like(z1), "split": torch.tensor(split),
            "prompt_index": torch.tensor(prompt_index), "relative": torch.tensor(relative)}


def test_validation_stats_bins_and_gain():
    stats = ValidationStats("gaussian", baseline_f=0.5, n_prompts=3)
    f = torch.tensor([0.05, 0.05, 0.95, 0.55])
    z1, z2 = [1.0, -1.0, 2.0, 1.0], [-1.0, 1.0, 2.0, 0.0]
    batch = _batch(f, z1, z2, [0, 3, 4, 5], [0, 1, 1, 2], [0.0, 0.15, 0.99, 0.5])
    stats.update(f[:2], {k: v[:2] for k, v in batch.items()})
    stats.update(f[2:], {k: v[2:] for k, v in batch.items()})
    stats.reduce(lambda t: t * 1)  # single device: the identity
    out = stats.summary()
    nll = np.mean([_mixture_nll(c, a, b) for c, a, b in zip(f.tolist(), z1, z2, strict=True)])
    baseline_f = [0.0, 0.5, 0.5, 0.5]  # the pinned start: f(0) = 0
    base = np.mean([_mixture_nll(c, a, b) for c, a, b in zip(baseline_f, z1, z2, strict=True)])
    assert out["pairs"] == 4 and out["prompts"] == 3 and out["likelihood"] == "gaussian"
    assert out["loss"] == pytest.approx(nll) and out["baseline_loss"] == pytest.approx(base)
    assert out["gain"] == pytest.approx(base - nll)
    lo, hi = out["gain_ci95"]
    assert lo <= out["gain"] <= hi
    calib = out["calibration"]
    assert len(calib) == N_BINS and [r["count"] for r in calib] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert calib[0]["mean_f"] == pytest.approx(0.05) and calib[0]["mean_z1z2"] == pytest.approx(-1.0)
    assert calib[1]["mean_f"] is None and calib[1]["mean_z1z2"] is None
    assert [r["count"] for r in out["f_by_position"]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    # sum over bins of count * |mean f - mean z1 z2| / pairs
    assert out["calibration_error"] == pytest.approx((2 * 1.05 + 0.55 + 3.05) / 4)


def test_bootstrap_ci_resamples_prompts():
    """A gain carried by one prompt out of 20 gets a wide interval; a gain every prompt shares, a tight one."""
    rng = np.random.default_rng(5)
    shared = np.column_stack([np.full(20, 10.0), rng.normal(20, 0.1, 20), rng.normal(21, 0.1, 20)])
    lo, hi = bootstrap_gain_ci(shared)
    assert 0.09 < lo < 0.1 < hi < 0.11  # (21 - 20) / 10 per pair, every prompt alike
    lopsided = np.column_stack([np.full(20, 10.0), np.full(20, 20.0), np.full(20, 20.0)])
    lopsided[0, 2] = 40.0  # one prompt carries a gain of 2 nats/pair, the others none
    lo, hi = bootstrap_gain_ci(lopsided)
    assert lo == 0.0 and hi > 0.2  # mean gain 0.1: the interval reaches 0 and far above
    assert np.isnan(bootstrap_gain_ci(np.zeros((3, 3)))[0])
