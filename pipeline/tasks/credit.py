"""The credit-assignment task: a positive control whose f is known exactly.

A prompt is a template of ``WIDTH`` slots: ``_`` marks a free slot, a digit a *decision* slot,
``.`` the end. The completion writes one symbol per slot (any filler ``a``-``d`` in a free slot; in
a decision slot, the digit the template shows) and then stops. Only the k decision tokens move the
reward; where they sit differs from prompt to prompt. Levels vary k, the length and the noise:

- ``binary``: 1 when every decision is right, else 0; flipped with probability ``noise``.
- ``graded``: the share of right decisions, plus Gaussian noise of sd ``noise``.

Under a policy that gets decision j right with probability p_j, independently of everything else
(the uniform policy has p_j = 1/4; the warmed-up ``credit-tiny`` is close to one), the true
f(t) = Var(E[R | first t tokens]) / Var(R) depends only on which decisions the first t tokens hold
(``true_f``; docs/tasks.md derives it). ``answer`` holds the whole specification as JSON, so the
truth of any dumped prefix follows from the dump's own columns.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from pipeline.tasks.base import ProceduralTask

WIDTH = 24  # template slots: the prompt has the same length at every level, so slot i sits WIDTH + 1 tokens back
DIGITS = ("0", "1", "2", "3")  # what a decision chooses among
FILLERS = ("a", "b", "c", "d")  # what a free slot may hold (any of them: free slots do not matter)
FREE, END, SEPARATOR = "_", ".", "="
STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True)
class Level:
    length: int  # completion symbols before the stop token
    decisions: int  # k
    kind: str  # "binary" or "graded"
    noise: float  # flip probability (binary) or Gaussian sd (graded)


LEVELS = {
    0: Level(8, 1, "binary", 0.0),
    1: Level(12, 2, "graded", 0.0),
    2: Level(16, 2, "binary", 0.1),
    3: Level(16, 3, "graded", 0.1),
    4: Level(24, 4, "graded", 0.1),  # held out: longer and more decisions than any training level
}


@dataclass(frozen=True)
class Spec:
    """What one prompt asks: decision slot -> its digit, the completion's length, the reward's kind and noise."""

    targets: dict[int, str]
    length: int
    kind: str
    noise: float

    @property
    def positions(self) -> list[int]:
        return sorted(self.targets)

    def to_answer(self) -> str:
        return json.dumps({"targets": {str(k): v for k, v in sorted(self.targets.items())}, "length": self.length,
                           "kind": self.kind, "noise": self.noise}, sort_keys=True)

    @classmethod
    def from_answer(cls, answer: str) -> Spec:
        spec = json.loads(answer)
        return cls({int(k): v for k, v in spec["targets"].items()}, int(spec["length"]), spec["kind"],
                   float(spec["noise"]))

    def template(self) -> str:
        slots = [self.targets.get(i, FREE) if i < self.length else END for i in range(WIDTH)]
        return " ".join(slots)


def make_spec(level: int, rng: random.Random) -> Spec:
    shape = LEVELS[level]
    positions = rng.sample(range(shape.length), shape.decisions)
    return Spec({p: rng.choice(DIGITS) for p in positions}, shape.length, shape.kind, shape.noise)


@dataclass
class CreditTask(ProceduralTask):
    def make_row(self, level: int, index: int) -> dict[str, Any]:
        spec = make_spec(level, random.Random(f"credit/{self.seed}/{level}/{index}"))
        return {"question": spec.template(), "answer": spec.to_answer(), "complexity": float(level)}


def decisions_right(completion: str, spec: Spec) -> list[bool]:
    """Per decision (in slot order): does the completion's symbol in that slot equal the digit?"""
    symbols = completion.split()
    return [p < len(symbols) and symbols[p] == spec.targets[p] for p in spec.positions]


def noise_draw(answer: str, completion: str, index: int) -> float:
    """A uniform in [0, 1) fixed by (prompt, completion, its place in the batch): the reward's noise is
    reproducible (a resumed run scores as the uninterrupted one) yet independent between sisters."""
    digest = hashlib.sha256(f"{answer}\x00{completion}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def noiseless_reward(right: Sequence[bool], kind: str) -> float:
    return float(all(right)) if kind == "binary" else sum(right) / len(right)


def credit_reward(completion: str, answer: str, index: int) -> float:
    spec = Spec.from_answer(answer)
    clean = noiseless_reward(decisions_right(completion, spec), spec.kind)
    if spec.noise == 0:
        return clean
    u = noise_draw(answer, completion, index)
    if spec.kind == "binary":
        return 1.0 - clean if u < spec.noise else clean
    return clean + spec.noise * STANDARD_NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))


def true_f(spec: Spec, p: Sequence[float], num_tokens: int | None = None) -> np.ndarray:
    """f(0..n) for a completion of n tokens (default: its length + the stop token) under a policy that
    gets decision j (slot order) right with probability p[j], independently.

    graded: Var(E[R|F_t]) = sum_{j decided} p_j(1-p_j) / k^2 of Var(R) = sum_j p_j(1-p_j) / k^2 + sd^2.
    binary: E[R|F_t] = eta + (1-2 eta) prod_{decided} X_j prod_{open} p_j, so
    Var(E[R|F_t]) = (1-2 eta)^2 P_open^2 (P_dec - P_dec^2) of Var(R) = r(1 - r), r = eta + (1-2 eta) P_all.
    """
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    n = spec.length + 1 if num_tokens is None else num_tokens
    decided = np.searchsorted(np.asarray(spec.positions), np.arange(n + 1), side="left")  # decisions before t
    if spec.kind == "graded":
        q = p * (1 - p)
        k = len(p)
        explained = np.concatenate([[0.0], np.cumsum(q)])[decided] / k**2
        total = q.sum() / k**2 + spec.noise**2
    else:
        eta = spec.noise
        prefix = np.concatenate([[1.0], np.cumprod(p)])  # P_dec for the first m decisions
        p_all = prefix[-1]
        p_open = np.divide(p_all, prefix[decided], out=np.zeros(n + 1), where=prefix[decided] > 0)
        explained = (1 - 2 * eta) ** 2 * p_open**2 * (prefix[decided] - prefix[decided] ** 2)
        r = eta + (1 - 2 * eta) * p_all
        total = r * (1 - r)
    return explained / total if total > 0 else np.zeros(n + 1)


def decision_mask(spec: Spec, num_tokens: int) -> np.ndarray:
    """Per completion token: is it a decision token?"""
    mask = np.zeros(num_tokens, dtype=bool)
    mask[[p for p in spec.positions if p < num_tokens]] = True
    return mask


def decision_accuracy(answers: Sequence[str], completions: Sequence[str]) -> dict[tuple[int, int], float]:
    """(level shape key, decision index) -> share right, pooled over completions: the p_j the truth uses.
    The key is (length, k, kind, noise) so prompts of one level share their p."""
    counts: dict[tuple, list[int]] = {}
    for answer, completion in zip(answers, completions, strict=True):
        spec = Spec.from_answer(answer)
        for j, right in enumerate(decisions_right(completion, spec)):
            tally = counts.setdefault((shape_key(spec), j), [0, 0])
            tally[0] += right
            tally[1] += 1
    return {key: right / total for key, (right, total) in counts.items()}


def shape_key(spec: Spec) -> tuple:
    return (spec.length, len(spec.targets), spec.kind, spec.noise)


def policy_p(spec: Spec, accuracy: dict[tuple, float]) -> list[float]:
    return [accuracy.get((shape_key(spec), j), 1 / len(DIGITS)) for j in range(len(spec.targets))]


def sample_completion(spec: Spec, p_right: float, rng: random.Random) -> str:
    """A completion of the idealised policy: uniform fillers, each decision right with probability p_right
    (else a uniformly drawn wrong digit). The warm-up of ``credit-tiny`` imitates it."""
    symbols = []
    for slot in range(spec.length):
        if slot in spec.targets:
            right = spec.targets[slot]
            symbols.append(right if rng.random() < p_right else rng.choice([d for d in DIGITS if d != right]))
        else:
            symbols.append(rng.choice(FILLERS))
    return " ".join(symbols)
