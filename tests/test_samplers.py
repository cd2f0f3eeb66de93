"""pipeline.samplers: formulas, feedback, bounds, gating, exact resume, reshuffling, errors, logs."""

import json
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.samplers import SAMPLERS, build, sampler_params
from pipeline.samplers.base import RowPool
from pipeline.samplers.e2h import balanced_schedule, cosine_schedule, gaussian_schedule, step_schedule


def level_rows(sizes, source="s"):
    return [{"level": level, "source": source} for level, n in enumerate(sizes) for _ in range(n)]


def mixed_rows(seed=0):
    """2 sources x 4 levels x 10 rows, random complexity."""
    rng = np.random.default_rng(seed)
    return [
        {"level": level, "source": src, "complexity": level + float(rng.random())}
        for src in ("a", "b")
        for level in range(4)
        for _ in range(10)
    ]


# ---------------------------------------------------------------- fixed schedules, exact values


@pytest.mark.parametrize("K", [1, 3, 7])
def test_balanced_is_uniform(K):
    assert balanced_schedule(5, 10, K) == pytest.approx([1 / K] * K)


@pytest.mark.parametrize(
    ("t", "T", "K", "active"),
    [(0, 100, 4, 0), (24, 100, 4, 0), (25, 100, 4, 1), (74, 100, 4, 2), (99, 100, 4, 3), (100, 100, 4, 3),
     (4, 10, 3, 1), (7, 10, 3, 2), (150, 100, 4, 3)],
)  # fmt: skip
def test_step_puts_all_mass_on_one_level(t, T, K, active):
    expected = np.zeros(K)
    expected[active] = 1.0
    assert step_schedule(t, T, K).tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("t", "T", "K", "expected"),
    [
        (0, 10, 3, [3 / 6, 2 / 6, 1 / 6]),  # alpha = 1: early
        (10, 10, 3, [1 / 6, 2 / 6, 3 / 6]),  # alpha = 0: late
        (5, 10, 3, [1 / 3, 1 / 3, 1 / 3]),  # alpha = 1/2
        (10, 30, 4, [0.325, 0.275, 0.225, 0.175]),  # alpha = (1 + cos(pi/3))/2 = 0.75
        (1, 2, 1, [1.0]),
    ],
)
def test_cosine_exact(t, T, K, expected):
    assert cosine_schedule(t, T, K) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("t", "T", "K", "kwargs", "expected"),
    [
        # mu = sqrt(1/4) * 3 = 1.5, sigma 0.5, p_min = 2/20
        (25, 100, 4, {}, [0.10539586298862748, 0.39460413701137254, 0.39460413701137254, 0.10539586298862748]),
        # mu = 0, no floor
        (0, 100, 4, {"min_prob": False}, [0.8805368899664695, 0.11916770940389823, 0.0002953872190732568, 1.34105589986e-08]),
        # mu = sqrt(16/64) * 4 = 2, sigma 1, floor 0.05
        (16, 64, 5, {"sigma": 1.0, "min_prob": 0.05},
         [0.0908665134122322, 0.23315100650242498, 0.35196496017068557, 0.23315100650242498, 0.0908665134122322]),
        # mu_exp = 1: t = T puts mu on the last level; p_min = 2/12
        (8, 8, 3, {"mu_exp": 1.0}, [1 / 6 + 0.5 * math.exp(-8) / (1 + math.exp(-2) + math.exp(-8)),
                                    1 / 6 + 0.5 * math.exp(-2) / (1 + math.exp(-2) + math.exp(-8)),
                                    1 / 6 + 0.5 * 1 / (1 + math.exp(-2) + math.exp(-8))]),
    ],
)  # fmt: skip
def test_gaussian_exact(t, T, K, kwargs, expected):
    assert gaussian_schedule(t, T, K, **kwargs) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", ["balanced", "step", "cosine", "gaussian"])
def test_schedule_samplers_follow_their_formula_step_by_step(name):
    """The sampler's mixture at step t is the schedule at t, with levels keyed by their values."""
    rows = [{"level": lv, "source": "s"} for lv in (2, 5, 9) for _ in range(4)]
    sampler = build(name, rows, batch_size=2, total_steps=12, seed=0)
    fn = {"balanced": balanced_schedule, "step": step_schedule, "cosine": cosine_schedule}.get(
        name, gaussian_schedule
    )
    for t in range(15):
        probs = sampler.probabilities()
        assert list(probs) == ["level_2", "level_5", "level_9"]
        assert list(probs.values()) == pytest.approx(fn(t, 12, 3).tolist())
        sampler.next_batch()


def test_step_sampler_serves_only_the_active_level():
    rows = level_rows([5, 5, 5])
    sampler = build("classical", rows, batch_size=4, total_steps=9, seed=1)
    for t in range(9):
        assert {rows[i]["level"] for i in sampler.next_batch()} == {t // 3}


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 500), K=st.integers(1, 12), frac=st.floats(0, 1.5), sigma=st.floats(0.05, 5))
def test_fixed_schedules_are_distributions_with_floors(T, K, frac, sigma):
    t = int(frac * T)
    for probs in (balanced_schedule(t, T, K), step_schedule(t, T, K), cosine_schedule(t, T, K)):
        assert probs.sum() == pytest.approx(1.0) and probs.min() >= 0
    assert cosine_schedule(t, T, K).min() >= 2 / (K * (K + 1)) - 1e-12
    gauss = gaussian_schedule(t, T, K, sigma=sigma)
    assert gauss.sum() == pytest.approx(1.0)
    assert gauss.min() >= 2 / (K * (K + 1)) - 1e-12


def test_gaussian_floor_too_large_fails_at_build():
    with pytest.raises(ValueError, match="exceeds total probability 1"):
        build("gaussian", level_rows([2, 2, 2]), batch_size=1, total_steps=5, min_prob=0.5)


# ---------------------------------------------------------------- variance_regularized


def test_variance_regularized_first_recompute_matches_documented_formula():
    rows = level_rows([4, 2, 2])
    sampler = build(
        "variance_regularized", rows, batch_size=2, total_steps=50, warmup_steps=3, update_period=5
    )
    for _ in range(3):
        assert sampler.probabilities() == pytest.approx(
            {"level_0": 1 / 3, "level_1": 1 / 3, "level_2": 1 / 3}
        )
        sampler.next_batch()
    # rewards: level 0 -> 1.0 (x4), level 1 -> 0.25, 0.75, level 2 -> 0.0 (x2); N = 8
    sampler.update(range(8), [1, 1, 1, 1, 0.25, 0.75, 0, 0])
    m, s, n = np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.25, 0.0]), np.array([4, 2, 2])
    explore = 1 / (1 + 3 * n / 8)
    w = np.exp(0.01 * (1 - m)) / np.exp(0.01 * (1 - m)).sum()
    vrex = m.mean() - m
    z = 0.3 * (1 - m) + 0.2 * s + 0.1 * explore + 0.3 * 3 * w + 0.1 * vrex
    q = np.exp(z) / np.exp(z).sum()
    expected = 0.1 + (1 - 0.3) * (0.5 / 3 + 0.5 * q)
    assert list(sampler.probabilities().values()) == pytest.approx(expected.tolist(), rel=1e-12)
    assert expected.tolist() == pytest.approx([0.30804, 0.33620, 0.35576], abs=1e-5)
    # not due again until 5 steps later: the mixture holds
    sampler.next_batch()
    sampler.update([0, 1], [1.0, 1.0])
    assert list(sampler.probabilities().values()) == pytest.approx(expected.tolist(), rel=1e-12)


def sim_reward(rows, idx, rates):
    return [rates[rows[i]["level"]] for i in idx]


def test_variance_regularized_moves_mass_to_low_reward_levels_within_floor():
    rows = level_rows([20, 20, 20])
    sampler = build(
        "variance_regularized", rows, batch_size=8, total_steps=100, warmup_steps=5, update_period=1,
        temperature=0.1, beta=1.0, min_prob=0.15, seed=3,
    )  # fmt: skip
    rates = [0.9, 0.5, 0.1]
    for _ in range(60):
        idx = sampler.next_batch()
        sampler.update(idx, sim_reward(rows, idx, rates))
        probs = np.array(list(sampler.probabilities().values()))
        assert probs.sum() == pytest.approx(1.0) and probs.min() >= 0.15 - 1e-12
    assert probs[2] > probs[1] > probs[0]
    assert probs[2] > 0.5
    assert probs[0] == pytest.approx(0.15, abs=0.01)


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.floats(0, 1), min_size=24, max_size=24), K=st.integers(2, 14), floor=st.floats(0, 0.3)
)
def test_variance_regularized_always_a_distribution_above_its_floor(rewards, K, floor):
    rows = level_rows([2] * K)
    sampler = build(
        "variance_regularized",
        rows,
        batch_size=4,
        total_steps=10,
        warmup_steps=0,
        update_period=1,
        min_prob=floor,
    )
    for chunk in range(6):
        idx = sampler.next_batch()
        sampler.update(idx, rewards[4 * chunk : 4 * chunk + 4])
        probs = np.array(list(sampler.probabilities().values()))
        assert probs.sum() == pytest.approx(1.0)
        assert probs.min() >= min(floor, 1 / K) - 1e-12


# ---------------------------------------------------------------- multi-source


def source_rows(sizes):
    return [{"level": 0, "source": src} for src, n in sizes.items() for _ in range(n)]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [0.5, 0.5]),
        ({"sampling_strategy": "proportional"}, [0.75, 0.25]),
        ({"source_weights": {"a": 1.0, "b": 2.0}}, [1 / 3, 2 / 3]),
        ({"source_weights": {"a": 0.0, "b": 5.0}}, [0.0, 1.0]),
    ],
)
def test_multi_source_fixed_weights(params, expected):
    rows = source_rows({"a": 30, "b": 10})
    sampler = build("MultiSourceSampler", rows, batch_size=4, total_steps=10, **params)
    assert list(sampler.probabilities()) == ["source_a", "source_b"]
    assert list(sampler.probabilities().values()) == pytest.approx(expected)
    drawn = [rows[i]["source"] for _ in range(5) for i in sampler.next_batch()]
    if expected[0] == 0:
        assert set(drawn) == {"b"}


def test_multi_source_adaptive_softmax_of_negative_reward_every_update_frequency():
    rows = source_rows({"a": 20, "b": 20})
    sampler = build(
        "multi_source", rows, batch_size=4, total_steps=10, adaptive_weights=True, update_frequency=2
    )
    sampler.update([0, 1, 20], [0.9, 0.9, 0.1])  # EMAs start at the first value
    assert list(sampler.probabilities().values()) == [0.5, 0.5]  # not yet: every 2nd update
    sampler.update([0, 20], [0.9, 0.1])
    w_b = math.exp(0.8) / (1 + math.exp(0.8))
    assert list(sampler.probabilities().values()) == pytest.approx([1 - w_b, w_b])
    assert sampler.reward_ema.tolist() == pytest.approx([0.9, 0.1])
    sampler.update([0], [0.4])  # EMA a: 0.9 * 0.9 + 0.1 * 0.4
    assert sampler.reward_ema.tolist() == pytest.approx([0.85, 0.1])


def test_multi_source_adaptive_moves_to_hard_source_and_respects_ratio_bound():
    rows = source_rows({"easy": 20, "mid": 20, "hard": 20})
    rates = {"easy": 0.95, "mid": 0.6, "hard": 0.05}
    sampler = build(
        "multi_source", rows, batch_size=12, total_steps=50, adaptive_weights=True, temperature=0.7,
        update_frequency=1, max_source_ratio=3.0, alpha=0.5, seed=2,
    )  # fmt: skip
    for _ in range(30):
        idx = sampler.next_batch()
        sampler.update(idx, [rates[rows[i]["source"]] for i in idx])
        w = np.array(list(sampler.probabilities().values()))
        assert w.sum() == pytest.approx(1.0) and w.max() / w.min() <= 3.0 + 1e-9
    probs = sampler.probabilities()
    assert probs["source_hard"] > probs["source_mid"] > probs["source_easy"]
    assert probs["source_hard"] / probs["source_easy"] == pytest.approx(3.0)  # the bound binds


def test_multi_source_adaptive_keeps_base_weights_as_prior_and_zero_stays_zero():
    rows = source_rows({"a": 5, "b": 5, "c": 5})
    sampler = build(
        "multi_source", rows, batch_size=3, total_steps=5, adaptive_weights=True, update_frequency=1,
        source_weights={"a": 2.0, "b": 1.0, "c": 0.0}, max_source_ratio=100.0,
    )  # fmt: skip
    sampler.update([0, 5], [0.5, 0.5])  # equal EMAs: the prior decides
    assert list(sampler.probabilities().values()) == pytest.approx([2 / 3, 1 / 3, 0.0])


# ---------------------------------------------------------------- complexity curricula


def curriculum_rows(n=100, other=50):
    """Source "s": complexity = (37 i) mod n, so sorted order is not row order; source "o": level 0."""
    rows = [{"level": 0, "source": "s", "complexity": float((37 * i) % n)} for i in range(n)]
    return rows + [{"level": 0, "source": "o"} for _ in range(other)]


def test_time_curriculum_serves_a_linearly_rising_percentile():
    rows = curriculum_rows()
    sampler = build(
        "CurriculumMultiSourceSampler", rows, batch_size=16, total_steps=30, complexity_source="s",
        initial_complexity_percentile=20, final_complexity_percentile=100, complexity_warmup_steps=10,
    )  # fmt: skip
    assert [sampler.percentile(t) for t in (0, 5, 10, 20)] == [20, 60, 100, 100]
    for t in range(14):
        limit = min(20 + 8 * t, 100)
        batch = sampler.next_batch()
        assert all(rows[i]["complexity"] < limit for i in batch if rows[i]["source"] == "s")
        assert len(sampler.pools[sampler.cs]) == limit  # pool grown to exactly the eligible rows
        assert sampler.probabilities() == {"source_o": 0.5, "source_s": 0.5}


def test_time_curriculum_needs_a_valid_complexity_source():
    with pytest.raises(ValueError, match=r"complexity_source must be one of the sources \['o', 's'\]"):
        build("time_curriculum", curriculum_rows(), batch_size=2, total_steps=5)
    solo = build("time_curriculum", curriculum_rows(other=0), batch_size=2, total_steps=5)
    assert solo.complexity_source == "s"  # the only source


def reward_sampler(**params):
    defaults = {
        "complexity_source": "s", "initial_complexity_percentile": 30, "final_complexity_percentile": 90,
        "num_intervals": 3, "reward_threshold": 0.5, "reward_alpha": 0.5, "min_batches_per_level": 4,
        "check_frequency": 3,
    }  # fmt: skip
    rows = curriculum_rows(other=0)
    return rows, build(
        "RewardGatedCurriculumSampler", rows, batch_size=8, total_steps=100, **{**defaults, **params}
    )


def test_reward_curriculum_intervals():
    _, sampler = reward_sampler()
    assert sampler.interval_bounds.tolist() == [0, 30, 50, 70, 90]
    assert list(sampler.probabilities()) == [f"source_s/interval_{j}" for j in range(4)]
    assert list(sampler.probabilities().values()) == [1.0, 0.0, 0.0, 0.0]


def test_reward_curriculum_unlocks_only_at_checks_after_min_batches():
    rows, sampler = reward_sampler()
    levels, emas = [], []
    for batch_no in range(1, 23):
        idx = sampler.next_batch()
        assert max(rows[i]["complexity"] for i in idx) < sampler.unlocked_rows()  # only unlocked rows
        sampler.update(idx, [0.0 if batch_no <= 7 else 1.0] * len(idx))
        levels.append(sampler.level)
        emas.append(sampler.curriculum_ema)
    # EMA crosses 0.5 at batch 8, but checks fall at batches 4, 7, 10 (min 4, then every 3)
    assert emas[6:9] == [0.0, 0.5, 0.75]
    assert levels.index(1) + 1 == 10
    # after a level-up the count restarts: next checks at 10 + 4 and 14 + 4; at most 3 unlocks
    assert levels == [0] * 9 + [1] * 4 + [2] * 4 + [3] * 5


def test_reward_curriculum_unlocks_exactly_when_ema_reaches_threshold():
    rows, sampler = reward_sampler(min_batches_per_level=0, check_frequency=1)
    seen = []
    for reward in (0.2, 0.4, 0.6, 0.8):
        sampler.update([0], [reward])
        seen.append((sampler.curriculum_ema, sampler.level))
    # EMA 0.2, 0.3, 0.45, 0.625: the first value >= 0.5 unlocks, the next check unlocks again
    assert seen == [(0.2, 0), (0.30000000000000004, 0), (0.45, 0), (0.625, 1)]
    # rewards of other sources do not move the curriculum EMA
    rows2 = curriculum_rows(n=20, other=5)
    other = build(
        "reward_curriculum", rows2, batch_size=2, total_steps=9, complexity_source="s", reward_threshold=0.1
    )
    other.update([20, 21], [1.0, 1.0])
    assert other.curriculum_ema is None


def test_reward_curriculum_focus_new_intervals_decay():
    _, sampler = reward_sampler(min_batches_per_level=0, check_frequency=1, reward_threshold=0.0,
                                focus_new_intervals=True, interval_decay=0.5)  # fmt: skip
    sampler.update([0], [1.0])
    sampler.update([0], [1.0])
    assert sampler.level == 2
    probs = list(sampler.probabilities().values())
    assert probs == pytest.approx([1 / 7, 2 / 7, 4 / 7, 0.0])
    assert [round(100 * p) for p in probs[2::-1]] == [57, 29, 14]
    # without focus: unlocked rows uniformly, i.e. by interval size 30/20
    _, plain = reward_sampler(min_batches_per_level=0, check_frequency=1, reward_threshold=0.0)
    plain.update([0], [1.0])
    assert list(plain.probabilities().values()) == pytest.approx([0.6, 0.4, 0.0, 0.0])


def test_reward_curriculum_splits_source_weight_over_intervals():
    rows = curriculum_rows(n=40, other=40)
    sampler = build(
        "reward_curriculum", rows, batch_size=4, total_steps=9, complexity_source="s", reward_threshold=0.0,
        min_batches_per_level=0, check_frequency=1, num_intervals=2, source_weights={"o": 3.0, "s": 1.0},
    )  # fmt: skip
    sampler.update([0], [1.0])
    probs = sampler.probabilities()
    assert list(probs) == ["source_o", "source_s/interval_0", "source_s/interval_1", "source_s/interval_2"]
    # interval sizes 12 and 14 (of 40: 30% -> 12, then 12..40 in two halves)
    assert list(probs.values()) == pytest.approx([0.75, 0.25 * 12 / 26, 0.25 * 14 / 26, 0.0])


# ---------------------------------------------------------------- learnability


def test_learnability_prompt_weights_are_p_one_minus_p_with_floor_and_unseen_bonus():
    rows = level_rows([3, 3])
    sampler = build("learnability", rows, batch_size=2, total_steps=10, alpha=1.0)
    sampler.update([0, 1, 2, 3], [1.0, 0.5, 0.0, 0.9])
    weights = np.array([0.01, 0.25, 0.01, 0.09, 0.25, 0.25])
    assert sampler.unit_probs() == pytest.approx(weights / weights.sum())
    assert sampler.probabilities() == pytest.approx(
        {"level_0": 0.27 / weights.sum(), "level_1": 0.59 / weights.sum()}
    )
    counts = np.bincount([i for _ in range(2000) for i in sampler.next_batch()], minlength=6)
    assert counts[1] > 8 * counts[0] and counts[1] > 8 * counts[2]
    assert all(len(set(sampler.next_batch())) == 2 for _ in range(50))  # no repeat within a batch


def test_learnability_level_unit_uses_level_success_ema():
    rows = level_rows([4, 4, 4])
    sampler = build("learnability", rows, batch_size=4, total_steps=10, unit="level", alpha=0.5)
    sampler.update([0, 1, 4, 8], [1.0, 1.0, 0.5, 0.0])
    weights = np.array([0.01, 0.25, 0.01])
    assert list(sampler.probabilities().values()) == pytest.approx((weights / weights.sum()).tolist())
    sampler.update([4], [1.0])  # level 1: 0.5 -> 0.75, weight 0.1875
    assert sampler.success.tolist() == [1.0, 0.75, 0.0]


# ---------------------------------------------------------------- state, reshuffling, independence

ROUND_TRIP = {
    "balanced": {},
    "step": {},
    "cosine": {},
    "gaussian": {"sigma": 1.0},
    "variance_regularized": {"warmup_steps": 5, "update_period": 3, "window_size": 20, "temperature": 0.2},
    "multi_source": {"adaptive_weights": True, "update_frequency": 2, "temperature": 0.2},
    "time_curriculum": {"complexity_source": "b", "complexity_warmup_steps": 60},
    "reward_curriculum": {"complexity_source": "b", "reward_threshold": 0.3, "min_batches_per_level": 3,
                          "check_frequency": 2, "focus_new_intervals": True, "adaptive_weights": True},
    "learnability": {"unit": "prompt"},
    "learnability-level": {"unit": "level"},
}  # fmt: skip


def test_round_trip_covers_every_sampler():
    assert {k.split("-")[0] for k in ROUND_TRIP} == set(SAMPLERS)


@pytest.mark.parametrize("key", list(ROUND_TRIP))
def test_state_dict_json_round_trip_gives_identical_next_100_batches(key):
    rows = mixed_rows()
    name, params = key.split("-")[0], ROUND_TRIP[key]

    def reward(idx, step):
        return [((7 * i + step) % 5) / 4 for i in idx]

    original = build(name, rows, batch_size=6, total_steps=120, seed=11, **params)
    for step in range(30):
        idx = original.next_batch()
        original.update(idx, reward(idx, step))
    state = json.loads(json.dumps(original.state_dict()))
    resumed = build(name, rows, batch_size=6, total_steps=120, seed=999, **params)
    resumed.load_state_dict(state)
    for step in range(30, 130):
        assert resumed.probabilities() == original.probabilities()
        a, b = original.next_batch(), resumed.next_batch()
        assert a == b
        original.update(a, reward(a, step))
        resumed.update(b, reward(b, step))
    assert resumed.state_dict() == original.state_dict()


def test_load_state_dict_rejects_another_sampler():
    state = build("balanced", level_rows([3]), batch_size=1, total_steps=3).state_dict()
    with pytest.raises(
        ValueError, match="state is for sampler 'balanced' over 3 rows, not 'cosine' over 3 rows"
    ):
        build("cosine", level_rows([3]), batch_size=1, total_steps=3).load_state_dict(state)


def test_exhausted_levels_reshuffle_without_repeats_within_a_pass():
    rows = level_rows([5, 7])
    sampler = build("balanced", rows, batch_size=4, total_steps=100, seed=5)
    drawn = [i for _ in range(60) for i in sampler.next_batch()]
    for level, size in ((0, 5), (1, 7)):
        members = set(range(5)) if level == 0 else set(range(5, 12))
        seq = [i for i in drawn if rows[i]["level"] == level]
        passes = [seq[k : k + size] for k in range(0, len(seq) - size + 1, size)]
        assert len(passes) >= 10
        assert all(set(p) == members for p in passes)  # each pass is a permutation: no repeats
        assert len({tuple(p) for p in passes}) > 1  # and passes are reshuffled


def test_pool_extend_keeps_the_pass_free_of_repeats():
    rng = np.random.default_rng(0)
    pool = RowPool(np.arange(5), rng)
    first = [pool.take(rng) for _ in range(3)]
    pool.extend(np.arange(5, 9), rng)
    rest = [pool.take(rng) for _ in range(6)]
    assert sorted(first + rest) == list(range(9))
    assert pool.take(rng) in range(9) and pool.pos == 1  # next pass


def test_two_samplers_in_one_process_are_independent():
    rows = level_rows([10, 10])
    a = build(
        "variance_regularized", rows, batch_size=4, total_steps=50, warmup_steps=0, update_period=1, seed=4
    )
    b = build(
        "variance_regularized", rows, batch_size=4, total_steps=50, warmup_steps=0, update_period=1, seed=4
    )
    first_b = b.next_batch()
    for _ in range(5):
        a.update(a.next_batch(), [0.0, 1.0, 0.0, 1.0])
    assert a.probabilities() != b.probabilities()
    assert b.probabilities() == {"level_0": 0.5, "level_1": 0.5}
    c = build(
        "variance_regularized", rows, batch_size=4, total_steps=50, warmup_steps=0, update_period=1, seed=4
    )
    assert c.next_batch() == first_b


# ---------------------------------------------------------------- errors and logs


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; valid: balanced, step, cosine, gaussian, "
                                         r"variance_regularized, multi_source, time_curriculum, reward_curriculum, "
                                         r"learnability \(old names: classical, MultiSourceSampler"):  # fmt: skip
        build("nope", level_rows([1]), batch_size=1, total_steps=1)


def test_unknown_parameter_lists_valid_ones_with_defaults():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) for sampler 'gaussian': sigmaa; "
                                         r"valid: mu_exp=0.5, sigma=0.5, min_prob=True"):  # fmt: skip
        build("gaussian", level_rows([1]), batch_size=1, total_steps=1, sigmaa=2)
    with pytest.raises(ValueError, match=r"valid: \(none\)"):
        build("balanced", level_rows([1]), batch_size=1, total_steps=1, sigma=2)


def test_missing_required_parameter_and_inherited_parameters():
    with pytest.raises(ValueError, match=r"sampler 'reward_curriculum' needs parameter\(s\) reward_threshold; "
                                         r"valid: reward_threshold \(required\), num_intervals=10"):  # fmt: skip
        build("reward_curriculum", level_rows([1]), batch_size=1, total_steps=1)
    params = sampler_params("time_curriculum")
    assert params["complexity_warmup_steps"] == 100 and params["initial_complexity_percentile"] == 30.0
    assert params["max_source_ratio"] == 3.0 and "seed" not in params


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        ([{"source": "a"}], {}, "row 0 needs an int 'level', got None"),
        ([{"level": 0, "source": "a"}, {"level": 1}], {}, "row 1 needs a str 'source'"),
        ([], {}, "rows is empty"),
    ],
)
def test_bad_rows(rows, params, message):
    with pytest.raises(ValueError, match=message):
        build("balanced", rows, batch_size=1, total_steps=1, **params)


def test_bad_source_weights_and_updates():
    rows = source_rows({"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"sources are \['a', 'b'\]; unknown \['c'\], missing \['b'\]"):
        build("multi_source", rows, batch_size=1, total_steps=1, source_weights={"a": 1, "c": 1})
    sampler = build("multi_source", rows, batch_size=1, total_steps=1)
    with pytest.raises(ValueError, match="2 indices but 1 rewards"):
        sampler.update([0, 1], [1.0])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        sampler.update([4], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        sampler.update([0], [float("nan")])


def test_log_lines_for_weight_changes_and_level_ups(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.samplers")
    rows = source_rows({"a": 20, "b": 20})
    sampler = build("multi_source", rows, batch_size=4, total_steps=10, adaptive_weights=True, update_frequency=2,
                    temperature=0.1)  # fmt: skip
    sampler.update([0, 20], [0.9, 0.1])
    sampler.update([0, 20], [0.9, 0.1])
    _, curriculum = reward_sampler(min_batches_per_level=0, check_frequency=1)
    curriculum.update([0], [0.8])
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.samplers"]
    assert "[MultiSourceSampler] batch 2 weights: a reward_ema=0.900 w=0.250, b reward_ema=0.100 w=0.750 " \
           "(max/min 3.00x)" in messages  # fmt: skip
    assert "[RewardCurriculumSampler] LEVEL UP 0 -> 1 at batch 1: reward EMA 0.800 >= 0.5; " \
           "'s' rows 30 -> 50 (complexity <= 49.000)" in messages  # fmt: skip
    assert "  interval 0: 30 rows, complexity [0.000, 29.000]" in messages
    assert all("\n" not in m for m in messages)
