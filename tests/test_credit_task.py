"""The credit task: its true f against exact enumeration, its reward, its rows."""

import itertools
import random

import numpy as np
import pytest

import rewards
from pipeline.tasks import build_rows, default_rewards
from pipeline.tasks.credit import (
    DIGITS,
    FILLERS,
    LEVELS,
    WIDTH,
    Spec,
    decision_accuracy,
    decisions_right,
    noiseless_reward,
    policy_p,
    sample_completion,
    true_f,
)


def enumerated_f(spec: Spec, p: list[float]) -> np.ndarray:
    """Var(E[R | first t symbols]) / Var(R) by summing over every completion of the idealised policy."""
    slots = []
    for slot in range(spec.length):
        if slot in spec.targets:
            j = spec.positions.index(slot)
            wrong = [d for d in DIGITS if d != spec.targets[slot]]
            slots.append([(spec.targets[slot], p[j])] + [(d, (1 - p[j]) / len(wrong)) for d in wrong])
        else:
            slots.append([(f, 1 / len(FILLERS)) for f in FILLERS])
    sequences = []
    for choice in itertools.product(*slots):
        symbols = [s for s, _ in choice]
        prob = float(np.prod([q for _, q in choice]))
        clean = noiseless_reward(decisions_right(" ".join(symbols), spec), spec.kind)
        mean = spec.noise + (1 - 2 * spec.noise) * clean if spec.kind == "binary" else clean
        sequences.append((symbols, prob, mean))
    total_mean = sum(q * m for _, q, m in sequences)
    if spec.kind == "binary":
        var_r = total_mean * (1 - total_mean)
    else:
        var_r = sum(q * (m - total_mean) ** 2 for _, q, m in sequences) + spec.noise**2
    f = []
    for t in range(spec.length + 2):  # + the stop token
        by_prefix: dict[tuple, list[float]] = {}
        for symbols, q, m in sequences:
            acc = by_prefix.setdefault(tuple(symbols[:t]), [0.0, 0.0])
            acc[0] += q
            acc[1] += q * m
        f.append(sum(w * (s / w - total_mean) ** 2 for w, s in by_prefix.values()) / var_r)
    return np.array(f)


@pytest.mark.parametrize("kind,noise", [("binary", 0.0), ("binary", 0.15), ("graded", 0.0), ("graded", 0.2)])
@pytest.mark.parametrize("targets,p", [({1: "2"}, [0.3]), ({0: "1", 3: "0"}, [0.25, 0.6]),
                                       ({2: "3", 3: "1", 4: "0"}, [0.5, 0.2, 0.9])])
def test_true_f_equals_exact_enumeration(kind, noise, targets, p):
    spec = Spec(targets, length=5, kind=kind, noise=noise)
    np.testing.assert_allclose(true_f(spec, p), enumerated_f(spec, p), atol=1e-12)


def test_true_f_shape_facts():
    graded = Spec({2: "1", 5: "0"}, length=8, kind="graded", noise=0.0)
    f = true_f(graded, [0.25, 0.25])
    assert f[0] == 0 and f[-1] == pytest.approx(1)
    assert np.flatnonzero(np.diff(f)).tolist() == [2, 5]  # only the decision tokens move f
    np.testing.assert_allclose(np.diff(f)[[2, 5]], [0.5, 0.5])
    binary = Spec({2: "1", 5: "0"}, length=8, kind="binary", noise=0.0)
    fb = true_f(binary, [0.25, 0.25])
    assert np.diff(fb)[5] > np.diff(fb)[2]  # under all-or-nothing the last decision settles most
    noisy = Spec({2: "1", 5: "0"}, length=8, kind="graded", noise=0.3)
    assert true_f(noisy, [0.25, 0.25])[-1] < 1  # noise is variance no token decides


def test_rows_are_deterministic_and_levels_differ():
    rows = build_rows("credit", 10, [0, 1, 2, 3])
    assert rows == build_rows("credit", 10, [0, 1, 2, 3])
    for row in rows:
        spec = Spec.from_answer(row["answer"])
        shape = LEVELS[row["level"]]
        assert (spec.length, len(spec.targets), spec.kind, spec.noise) == (
            shape.length, shape.decisions, shape.kind, shape.noise)
        assert len(row["question"].split()) == WIDTH
    positions = {tuple(Spec.from_answer(r["answer"]).positions) for r in build_rows("credit", 40, [1])}
    assert len(positions) > 20  # decisions sit at different slots from prompt to prompt
    assert default_rewards("credit") == {"credit": 1.0}


def test_reward_scores_decisions_and_its_noise_is_calibrated():
    spec = Spec({1: "2", 3: "0"}, length=4, kind="graded", noise=0.0)
    reward = rewards.REWARDS["credit"]
    scores = reward(None, ["a 2 b 0", "a 2 b 1", "a 1 b 1", "a 2"], answer=[spec.to_answer()] * 4,
                    task_name=["credit"] * 4)
    assert scores == [1.0, 0.5, 0.0, 0.5]
    assert reward(None, ["a 2 b 0"], answer=[spec.to_answer()], task_name=["arithmetic"]) == [0.0]
    noisy = Spec({1: "2"}, length=4, kind="graded", noise=0.2)
    draws = np.array(reward(None, ["a 2 b c"] * 4000, answer=[noisy.to_answer()] * 4000,
                            task_name=["credit"] * 4000))
    assert abs(draws.mean() - 1.0) < 0.02 and abs(draws.std() - 0.2) < 0.01
    flips = Spec({1: "2"}, length=4, kind="binary", noise=0.1)
    draws = np.array(reward(None, ["a 2 b c"] * 4000, answer=[flips.to_answer()] * 4000,
                            task_name=["credit"] * 4000))
    assert set(draws) == {0.0, 1.0} and abs((1 - draws).mean() - 0.1) < 0.015
    assert draws.tolist() == reward(None, ["a 2 b c"] * 4000, answer=[flips.to_answer()] * 4000,
                                    task_name=["credit"] * 4000)  # reproducible


def test_decision_accuracy_recovers_the_policy():
    spec = Spec({1: "2", 6: "0"}, length=8, kind="binary", noise=0.0)
    rng = random.Random(0)
    completions = [sample_completion(spec, 0.4, rng) for _ in range(4000)]
    accuracy = decision_accuracy([spec.to_answer()] * len(completions), completions)
    np.testing.assert_allclose(policy_p(spec, accuracy), [0.4, 0.4], atol=0.03)
