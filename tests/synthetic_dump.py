"""Stage-1 dumps whose true f(t) is known, for the importance network's ground-truth tests.

Every truth has two deciding events per completion, each "good" with the prompt's probability p
(p ~ U[0.3, 0.7]); the reward is [first good] + [second good] + NOISE * N(0, 1), drawn independently
per completion. Pairs follow the true process: t ~ U{0..LENGTH} independent of sister A, sister B =
A[:t] plus a fresh continuation. With s = p (1 - p) and r = the number of deciding events in the
first t tokens:

    f(t) = r * s / (2 s + NOISE^2)        (0, ~0.49, ~0.98)

The truths differ in where the events are and what gives them away:

- ``regions``: events at fixed positions K1 = 2, K2 = 5 (marker tokens), and the filler comes from
  a different pool in each region, so the last token alone tells the region (the easy case).
- ``random_position``: the two marker tokens stand at a uniformly random pair of positions of each
  completion (drawn token by token, so a continuation from any prefix is the true conditional),
  among filler from one pool shared by all positions: f jumps right after each marker, wherever it is.
- ``position_only``: events at K1 and K2, but every token comes from the same pool (a "good" token
  with probability p): the deciding tokens look like any other, f depends on t alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dump import schema_for, tokenizer_fingerprint

LENGTH, K1, K2, NOISE = 8, 2, 5, 0.1
RANDOM_LENGTH = 12  # random_position: room for the markers to fall anywhere
PROMPT_POOL = np.arange(3, 11)  # the tiny tokenizer's ids 0..2 are special tokens
PROMPT_END = [1, 90]  # like a chat template's "<|im_start|>assistant"
POOLS = (np.arange(60, 62), np.arange(70, 72), np.arange(80, 82))  # regions: fillers before K1, between, after K2
SHARED_POOL = np.arange(60, 64)  # random_position: one filler pool everywhere
GOOD_POOL, BAD_POOL = np.arange(60, 62), np.arange(62, 64)  # position_only: a token's meaning is its position
GOOD1, BAD1, GOOD2, BAD2 = 250, 251, 252, 253
REWARD_NAME = "marker"


def _marker(rng: np.random.Generator, p: float, which: int) -> int:
    good = rng.random() < p
    return (GOOD1 if good else BAD1) if which == 0 else (GOOD2 if good else BAD2)


def _regions_continue(rng: np.random.Generator, p: float, prefix: np.ndarray) -> np.ndarray:
    tokens = np.array([rng.choice(POOLS[r]) for r in np.searchsorted([K1, K2], np.arange(LENGTH))])
    tokens[K1], tokens[K2] = _marker(rng, p, 0), _marker(rng, p, 1)
    tokens[: len(prefix)] = prefix
    return tokens


def _random_position_continue(rng: np.random.Generator, p: float, prefix: np.ndarray) -> np.ndarray:
    """Selection sampling: with m markers left and n positions left, this one is a marker w.p. m / n,
    which makes the two marker positions a uniform random pair, conditionally on any prefix."""
    tokens = list(prefix)
    placed = int(np.isin(prefix, [GOOD1, BAD1, GOOD2, BAD2]).sum())
    for position in range(len(prefix), RANDOM_LENGTH):
        if rng.random() < (2 - placed) / (RANDOM_LENGTH - position):
            tokens.append(_marker(rng, p, placed))
            placed += 1
        else:
            tokens.append(int(rng.choice(SHARED_POOL)))
    return np.array(tokens)


def _position_only_continue(rng: np.random.Generator, p: float, prefix: np.ndarray) -> np.ndarray:
    tokens = np.array([rng.choice(GOOD_POOL if rng.random() < p else BAD_POOL) for _ in range(LENGTH)])
    tokens[: len(prefix)] = prefix
    return tokens


def _marker_events(tokens: np.ndarray) -> np.ndarray:
    """Positions of the deciding tokens and whether each is good (markers, wherever they stand)."""
    where = np.flatnonzero(np.isin(tokens, [GOOD1, BAD1, GOOD2, BAD2]))
    return np.stack([where, np.isin(tokens[where], [GOOD1, GOOD2])])


def _fixed_events(tokens: np.ndarray) -> np.ndarray:
    return np.stack([[K1, K2], [tokens[K1] in (GOOD1, *GOOD_POOL), tokens[K2] in (GOOD2, *GOOD_POOL)]])


@dataclass(frozen=True)
class Truth:
    length: int
    continue_from: Callable[[np.random.Generator, float, np.ndarray], np.ndarray]
    events: Callable[[np.ndarray], np.ndarray]  # (2, 2): positions of the deciding tokens, whether good

    def reward(self, rng: np.random.Generator, tokens: np.ndarray) -> float:
        return float(self.events(tokens)[1].sum()) + NOISE * rng.standard_normal()

    def f(self, p: float, tokens: np.ndarray) -> np.ndarray:
        """The true f(0..length) of one completion."""
        s = p * (1 - p)
        decided = (self.events(tokens)[0][None, :] < np.arange(self.length + 1)[:, None]).sum(1)
        return decided * s / (2 * s + NOISE**2)

    def edges(self, tokens: np.ndarray) -> np.ndarray:
        """The t on both sides of each jump of f (t = K and K + 1 for a deciding token at K)."""
        positions = self.events(tokens)[0]
        return np.unique(np.concatenate([positions, positions + 1]))


TRUTHS = {"regions": Truth(LENGTH, _regions_continue, _fixed_events),
          "random_position": Truth(RANDOM_LENGTH, _random_position_continue, _marker_events),
          "position_only": Truth(LENGTH, _position_only_continue, _fixed_events)}


def true_f(p: float, t: int) -> float:
    """The ``regions`` and ``position_only`` truths' f(t), which depends on t alone."""
    s = p * (1 - p)
    return ((t > K1) + (t > K2)) * s / (2 * s + NOISE**2)


@dataclass
class HeldOut:
    prompts: list[list[int]]
    completions: list[list[int]]
    p: list[float]
    f: np.ndarray  # (n, length + 1) true f
    edges: np.ndarray  # (n, length + 1) bool: t next to a jump of f


def _prompt(rng: np.random.Generator) -> tuple[list[int], float]:
    return rng.choice(PROMPT_POOL, rng.integers(3, 7)).tolist() + PROMPT_END, float(rng.uniform(0.3, 0.7))


def held_out(n: int, seed: int, truth: str = "regions") -> HeldOut:
    """Fresh prompts and completions from the same process (never in a dump written with another seed)."""
    rng, process = np.random.default_rng(seed), TRUTHS[truth]
    prompts, completions, ps, fs, edges = [], [], [], [], []
    for _ in range(n):
        prompt, p = _prompt(rng)
        tokens = process.continue_from(rng, p, np.array([], dtype=np.int64))
        edge = np.zeros(process.length + 1, dtype=bool)
        edge[process.edges(tokens)] = True
        prompts.append(prompt)
        completions.append(tokens.tolist())
        ps.append(p)
        fs.append(process.f(p, tokens))
        edges.append(edge)
    return HeldOut(prompts, completions, ps, np.array(fs), np.array(edges))


def write_synthetic_dump(path: Path, tokenizer, model_name: str, *, truth: str = "regions", n_prompts: int = 64,
                         groups_per_prompt: int = 4, group_size: int = 8, seed: int = 0,
                         zero_variance_prompts: int = 0, nan_groups: int = 0,
                         drop_columns: tuple[str, ...] = ()) -> Path:
    """Write ``path`` (a parquet file) with stage 1's schema and key-value metadata.

    ``zero_variance_prompts``: the first prompts get reward 0 for every completion;
    ``nan_groups``: the last groups get one NaN reward (a failed reward function).
    """
    rng, process = np.random.default_rng(seed), TRUTHS[truth]
    rows = []
    for prompt_id in range(n_prompts):
        prompt, p = _prompt(rng)
        for g in range(groups_per_prompt):
            group_id = prompt_id * groups_per_prompt + g
            group = []
            for pair_id in range(group_size // 2):
                t = int(rng.integers(0, process.length + 1))
                a = process.continue_from(rng, p, np.array([], dtype=np.int64))
                degenerate = t >= process.length  # sister A ended at the split: B == A
                b = a.copy() if degenerate else process.continue_from(rng, p, a[:t])
                ra = process.reward(rng, a)
                rb = ra if degenerate else process.reward(rng, b)
                for sister, (tokens, reward) in enumerate(((a, ra), (b, rb))):
                    group.append(dict(pair_id=pair_id, sister=sister, split_token_idx=t, degenerate=degenerate,
                                      completion_token_ids=tokens.tolist(), reward=reward))
            rewards = np.array([r["reward"] for r in group])
            if prompt_id < zero_variance_prompts:
                rewards[:] = 0.0
            if group_id >= n_prompts * groups_per_prompt - nan_groups:
                rewards[0] = np.nan
            for completion_id, (row, reward) in enumerate(zip(group, rewards, strict=True)):
                row.update(prompt_id=prompt_id, prompt_text=tokenizer.decode(prompt), prompt_token_ids=prompt,
                           task_name="synthetic", level=0, answer="", group_id=group_id,
                           completion_id=completion_id, completion_text=tokenizer.decode(row["completion_token_ids"]),
                           num_completion_tokens=process.length, finish_reason="length", reward=float(reward),
                           reward_group_mean=float(rewards.mean()), reward_group_var=float(rewards.var(ddof=1)))
                for suffix in ("", "_group_mean", "_group_var"):
                    row[f"reward_{REWARD_NAME}{suffix}"] = row[f"reward{suffix}"]
                rows.append(row)
    kv = {"model_name": model_name, "reward_names": [REWARD_NAME], "reward_weights": {REWARD_NAME: 1.0},
          "tokenizer": tokenizer_fingerprint(tokenizer), "task_name": "synthetic", "group_size": group_size}
    schema = schema_for([REWARD_NAME], kv)
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.drop_columns(list(drop_columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
