"""The pair NLL against scipy's bivariate normal, its stability near f = 1, the constant baseline, the metrics."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pipeline.importance.loss import F_MAX, best_constant_f, pair_nll
from pipeline.importance.metrics import N_BINS, ValidationStats


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
    f = rng.uniform(0, 0.999, size=50)
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
    # exact ties at F_MAX: log-determinant term dominates and is bounded by log(2e-4) / 2
    assert loss[2].item() == pytest.approx(math.log(2 * math.pi) + 0.5 * math.log1p(-F_MAX**2) + 25 / (1 + F_MAX),
                                           rel=1e-4)
    assert loss[3].item() - loss[2].item() == pytest.approx(100 / (4 * (1 - F_MAX)) - 25 / (1 + F_MAX), rel=1e-3)


@pytest.mark.parametrize("true_f", [-0.3, 0.0, 0.3, 0.7, 0.999])
def test_best_constant_f_is_the_grid_minimum(true_f):
    rng = np.random.default_rng(2)
    z = rng.multivariate_normal([0, 0], [[1, true_f], [true_f, 1]], size=4000)
    got = best_constant_f(z[:, 0], z[:, 1])
    grid = torch.linspace(0, F_MAX, 2001, dtype=torch.float64)
    losses = pair_nll(grid[:, None], torch.tensor(z[:, 0]), torch.tensor(z[:, 1])).mean(1)
    assert got == pytest.approx(float(grid[losses.argmin()]), abs=float(grid[1]) + 1e-9)
    best = pair_nll(torch.tensor(got, dtype=torch.float64), torch.tensor(z[:, 0]), torch.tensor(z[:, 1])).mean()
    assert best <= losses.min() + 1e-12
    assert got == pytest.approx(max(true_f, 0.0), abs=0.05)  # negative correlations floor at 0


def test_validation_stats_bins_and_gain():
    stats = ValidationStats(baseline_f=0.5)
    f = torch.tensor([0.05, 0.05, 0.95, 0.55])
    z1 = torch.tensor([1.0, -1.0, 2.0, 1.0])
    z2 = torch.tensor([-1.0, 1.0, 2.0, 0.0])
    relative = torch.tensor([0.0, 0.15, 0.99, 0.5])
    stats.update(f[:2], z1[:2], z2[:2], relative[:2])
    stats.update(f[2:], z1[2:], z2[2:], relative[2:])
    stats.reduce(lambda t: t * 1)  # single device: the identity
    out = stats.summary()
    nll = pair_nll(f.double(), z1.double(), z2.double()).mean().item()
    base = pair_nll(torch.full((4,), 0.5, dtype=torch.float64), z1.double(), z2.double()).mean().item()
    assert out["pairs"] == 4
    assert out["nll"] == pytest.approx(nll) and out["baseline_nll"] == pytest.approx(base)
    assert out["gain"] == pytest.approx(base - nll)
    calib = out["calibration"]
    assert len(calib) == N_BINS and [r["count"] for r in calib] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert calib[0]["mean_f"] == pytest.approx(0.05) and calib[0]["mean_z1z2"] == pytest.approx(-1.0)
    assert calib[1]["mean_f"] is None and calib[1]["mean_z1z2"] is None
    assert [r["count"] for r in out["f_by_position"]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    # sum over bins of count * |mean f - mean z1 z2| / pairs
    assert out["calibration_error"] == pytest.approx((2 * 1.05 + 0.55 + 3.05) / 4)
