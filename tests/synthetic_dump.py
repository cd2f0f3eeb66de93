"""A stage-1 dump whose true f(t) is known, for the importance network's ground-truth tests.

Completions are ``LENGTH`` random filler tokens, except at positions K1 and K2, where a marker
token is drawn: the "good" marker with the prompt's probability p, else the "bad" one. The
reward is [good at K1] + [good at K2] + NOISE * N(0, 1), drawn independently per completion.
Pairs follow the true process: t ~ U{0..LENGTH} independent of sister A, sister B = A[:t] plus
fresh tokens. So, with s = p(1 - p):

    f(t) = 0                        for t <= K1   (no marker in the prefix)
    f(t) = s / (2 s + NOISE^2)      for K1 < t <= K2  (~0.49)
    f(t) = 2 s / (2 s + NOISE^2)    for t > K2    (~0.98)

Filler tokens come from a different small pool before K1, between K1 and K2 and after K2, so the
last token of the prefix alone tells which region t is in: even a frozen random tiny backbone
can represent the truth, and an off-by-one in where f(t) is read shows up at the boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dump import schema_for, tokenizer_fingerprint

LENGTH, K1, K2, NOISE = 8, 2, 5, 0.1
PROMPT_POOL = np.arange(3, 11)  # the tiny tokenizer's ids 0..2 are special tokens
PROMPT_END = [1, 90]  # like a chat template's "<|im_start|>assistant": f(0) is read at the same token
POOLS = (np.arange(60, 62), np.arange(70, 72), np.arange(80, 82))  # fillers before K1, between, after K2
GOOD1, BAD1, GOOD2, BAD2 = 250, 251, 252, 253
REWARD_NAME = "marker"


def true_f(p: float, t: int) -> float:
    s = p * (1 - p)
    return 0.0 if t <= K1 else (s if t <= K2 else 2 * s) / (2 * s + NOISE**2)


def _continue(rng: np.random.Generator, p: float, prefix: np.ndarray) -> np.ndarray:
    region = np.searchsorted([K1, K2], np.arange(LENGTH))
    tokens = np.array([rng.choice(POOLS[r]) for r in region])
    tokens[K1] = GOOD1 if rng.random() < p else BAD1
    tokens[K2] = GOOD2 if rng.random() < p else BAD2
    tokens[: len(prefix)] = prefix
    return tokens


def _reward(rng: np.random.Generator, tokens: np.ndarray) -> float:
    return float(tokens[K1] == GOOD1) + float(tokens[K2] == GOOD2) + NOISE * rng.standard_normal()


@dataclass
class HeldOut:
    prompts: list[list[int]]
    completions: list[list[int]]
    p: list[float]


def _prompt(rng: np.random.Generator) -> tuple[list[int], float]:
    return rng.choice(PROMPT_POOL, rng.integers(3, 7)).tolist() + PROMPT_END, float(rng.uniform(0.3, 0.7))


def held_out(n: int, seed: int) -> HeldOut:
    """Fresh prompts and completions from the same process (never in a dump written with another seed)."""
    rng = np.random.default_rng(seed)
    out = HeldOut([], [], [])
    for _ in range(n):
        prompt, p = _prompt(rng)
        out.prompts.append(prompt)
        out.completions.append(_continue(rng, p, np.array([], dtype=np.int64)).tolist())
        out.p.append(p)
    return out


def write_synthetic_dump(path: Path, tokenizer, model_name: str, *, n_prompts: int = 64, groups_per_prompt: int = 4,
                         group_size: int = 8, seed: int = 0, zero_variance_prompts: int = 0,
                         nan_groups: int = 0, drop_columns: tuple[str, ...] = ()) -> Path:
    """Write ``path`` (a parquet file) with stage 1's schema and key-value metadata.

    ``zero_variance_prompts``: the first prompts get reward 0 for every completion;
    ``nan_groups``: the last groups get one NaN reward (a failed reward function).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_id in range(n_prompts):
        prompt, p = _prompt(rng)
        for g in range(groups_per_prompt):
            group_id = prompt_id * groups_per_prompt + g
            group = []
            for pair_id in range(group_size // 2):
                t = int(rng.integers(0, LENGTH + 1))
                a = _continue(rng, p, np.array([], dtype=np.int64))
                degenerate = t >= LENGTH  # sister A ended at the split: B == A
                b = a.copy() if degenerate else _continue(rng, p, a[:t])
                ra = _reward(rng, a)
                rb = ra if degenerate else _reward(rng, b)
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
                           num_completion_tokens=LENGTH, finish_reason="length", reward=float(reward),
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
