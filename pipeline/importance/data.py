"""Stage-2 data: pairs from the stage-1 dump, their standardised rewards, the split by prompt.

One training example per non-degenerate pair: input = prompt + the shared prefix (the first
``split_token_idx`` completion tokens), target = the two sisters' rewards, raw and standardised by
the prompt's m_q and v_q (docs/design.md). Inputs come from the stored token ids, never from
re-tokenised text, so the backbone must use the dump's tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.dump import dump_files, read_dump
from pipeline.errors import UserError
from pipeline.importance.loss import is_binary
from pipeline.importance.sampling import ShardSampler

log = logging.getLogger(__name__)

GROUP_STATS = ("group", "prompt")
VAR_EPS = 1e-10  # a group whose reward variance is below this carries no information about f
PAIR_COLUMNS = ["prompt_id", "group_id", "pair_id", "sister", "split_token_idx", "degenerate",
                "prompt_token_ids", "completion_token_ids"]


def reward_column(reward_key: str, columns: list[str]) -> str:
    """``reward`` or ``reward_<name>`` as stored; a bare reward-function name ``<name>`` is accepted too."""
    keys = [c for c in columns if c.startswith("reward") and not c.endswith(("_group_mean", "_group_var"))]
    for candidate in (reward_key, f"reward_{reward_key}"):
        if candidate in keys:
            return candidate
    raise UserError(f"--reward_key '{reward_key}' is not a reward column of the rollouts; "
                    f"choose one of: {', '.join(keys) or '(none)'}")


@dataclass
class Pairs:
    """Parallel per-pair arrays (sister A's completion holds the shared prefix)."""

    index: np.ndarray  # group_id * 2^16 + pair_id: a key for caches, the same whatever pairs another run keeps
    prompt_id: np.ndarray
    group_id: np.ndarray
    split: np.ndarray  # t, the number of shared completion tokens
    prompt: list[np.ndarray]
    completion: list[np.ndarray]  # sister A's whole completion
    r1: np.ndarray
    r2: np.ndarray
    mean: np.ndarray  # m_q: for a 0/1 reward, the success rate p of the Bernoulli likelihood
    binary: np.ndarray  # 1.0 where every reward of the pair's prompt is 0 or 1 (the Bernoulli describes it), else 0.0
    z1: np.ndarray
    z2: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, mask: np.ndarray) -> Pairs:
        keep = np.flatnonzero(mask)
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            values[field.name] = [value[i] for i in keep] if isinstance(value, list) else value[keep]
        return Pairs(**values)

    def targets(self) -> dict[str, np.ndarray]:
        """What the likelihoods read (``TARGETS``): the sisters' z and raw rewards, p = m_q, whether the prompt is 0/1."""
        return {"z1": self.z1, "z2": self.z2, "r1": self.r1, "r2": self.r2, "p": self.mean, "binary": self.binary}

    def relative_position(self) -> np.ndarray:
        """t / len(completion A), in [0, 1): where in the completion the split falls."""
        return self.split / np.array([len(c) for c in self.completion], dtype=np.float64)


def _require(path: str | Path, names: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in names]
    if missing:
        raise UserError(f"rollouts '{path}' lack column(s) {', '.join(missing)}: "
                        f"pass a dump written by generate_paired_rollouts.py")


def dump_reward_column(path: str | Path, reward_key: str) -> str:
    """The column ``--reward_key`` names in the dump, read from its schema (the data is not loaded)."""
    names = pq.read_schema(dump_files(path)[0]).names
    _require(path, names, PAIR_COLUMNS + ["reward"])  # every stage-1 dump has the total reward
    return reward_column(reward_key, names)


def load_pairs(path: str | Path, reward_key: str = "reward",
               group_stats: str = "prompt") -> tuple[Pairs, dict[str, int], str]:
    """Every informative pair of the dump, counts of what was read and dropped (and why), the reward column.

    ``group_stats``: m_q, v_q from the pair's own group (the stored ``<key>_group_mean/var``) or
    pooled over every completion of the prompt in the dump (ddof=1, failed rewards skipped): more
    samples shrink the plug-in bias of section 1's caveat.
    """
    if group_stats not in GROUP_STATS:
        raise UserError(f"--group_stats must be one of {', '.join(GROUP_STATS)}, got '{group_stats}'")
    names = pq.read_schema(dump_files(path)[0]).names
    _require(path, names, PAIR_COLUMNS + ["reward"])  # every stage-1 dump has the total reward
    column = reward_column(reward_key, names)
    stats_columns = [f"{column}_group_mean", f"{column}_group_var"] if group_stats == "group" else []
    _require(path, names, stats_columns)
    rows = read_dump(path, PAIR_COLUMNS + [column] + stats_columns).to_pandas()
    if rows.empty:
        raise UserError(f"rollouts '{path}' hold no rows: the stage-1 run wrote nothing, re-run it")
    if group_stats == "group":
        rows["m"], rows["v"] = rows[stats_columns[0]], rows[stats_columns[1]]
    else:
        by_prompt = rows.groupby("prompt_id")[column]
        rows["m"], rows["v"] = by_prompt.transform("mean"), by_prompt.transform("var")
    rows["binary"] = rows.groupby("prompt_id")[column].transform(is_binary).astype(np.float64)

    a, b, counts = _informative_pairs(rows, column)
    if a.empty:
        raise UserError(
            f"rollouts '{path}' have no informative pair for '{column}' ({counts['pairs']} pairs: "
            f"{counts['pairs_degenerate']} degenerate, {counts['pairs_nonfinite']} with non-finite rewards, "
            f"{counts['pairs_zero_variance']} in zero-variance groups): use prompts the model sometimes solves, "
            f"another --reward_key, or (many degenerate pairs) longer completions"
        )

    split = a["split_token_idx"].to_numpy().astype(np.int64)
    prompt = [np.asarray(p, dtype=np.int64) for p in a["prompt_token_ids"]]
    completion = [np.asarray(c, dtype=np.int64) for c in a["completion_token_ids"]]
    _check_prefixes(path, prompt, completion, [np.asarray(c) for c in b["completion_token_ids"]], split)
    std = np.sqrt(a["v"].to_numpy())
    m = a["m"].to_numpy()
    group_id = a.index.get_level_values("group_id").to_numpy()
    pair_key = group_id.astype(np.int64) * 2**16 + a.index.get_level_values("pair_id").to_numpy().astype(np.int64)
    pairs = Pairs(index=pair_key, prompt_id=a["prompt_id"].to_numpy(), group_id=group_id, split=split,
                  prompt=prompt, completion=completion, r1=a[column].to_numpy(), r2=b[column].to_numpy(), mean=m,
                  binary=a["binary"].to_numpy(), z1=(a[column].to_numpy() - m) / std, z2=(b[column].to_numpy() - m) / std)
    return pairs, counts, column


def _informative_pairs(rows: pd.DataFrame, column: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Sister A and sister B rows of the pairs that carry information about f, and why the others don't."""
    keys = ["group_id", "pair_id"]
    a = rows[rows["sister"] == 0].set_index(keys)
    b = rows[rows["sister"] == 1].set_index(keys)
    a, b = a.align(b, join="inner", axis=0)
    counts = {"rows": len(rows), "prompts": rows["prompt_id"].nunique(), "groups": rows["group_id"].nunique(),
              "pairs": len(a), "pairs_incomplete": len(rows) - 2 * len(a)}
    reasons = {
        "degenerate": (a["degenerate"] | b["degenerate"]).to_numpy(),
        "nonfinite": ~np.isfinite(a[[column, "m", "v"]].to_numpy()).all(1) | ~np.isfinite(b[column].to_numpy()),
    }
    reasons["zero_variance"] = ~reasons["nonfinite"] & (a["v"].to_numpy() <= VAR_EPS)
    group_ids = a.index.get_level_values("group_id").to_numpy()
    drop = np.zeros(len(a), dtype=bool)
    for reason, mask in reasons.items():  # each pair is counted under its first reason only
        mask = mask & ~drop
        counts[f"pairs_{reason}"] = int(mask.sum())
        if reason != "degenerate":
            counts[f"groups_{reason}"] = len(np.unique(group_ids[mask]))
        drop |= mask
    counts["pairs_kept"] = int((~drop).sum())
    return a[~drop], b[~drop], counts


def _check_prefixes(path: str | Path, prompt: list[np.ndarray], first: list[np.ndarray],
                    second: list[np.ndarray], split: np.ndarray) -> None:
    """The dump is only meaningful if sisters really share their first t tokens."""
    if any(len(p) == 0 for p in prompt):
        raise UserError(f"rollouts '{path}' contain an empty prompt_token_ids: f(0) needs a prompt token")
    bad = sum(int(t > len(x) or t > len(y) or not np.array_equal(x[:t], y[:t]))
              for x, y, t in zip(first, second, split, strict=True))
    if bad:
        raise UserError(f"rollouts '{path}': {bad} non-degenerate pair(s) whose sisters do not share their "
                        f"first split_token_idx completion tokens: the dump is corrupt, regenerate it")


def split_by_prompt(pairs: Pairs, val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Held-out prompts, not held-out pairs: pairs of one prompt share m_q, v_q and often text."""
    prompts = np.unique(pairs.prompt_id)
    if len(prompts) < 2:
        raise UserError("the rollouts' informative pairs come from a single prompt: a train/validation "
                        "split by prompt needs at least 2; generate rollouts for more prompts")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(len(prompts) - 1, max(1, round(val_fraction * len(prompts))))
    val_prompts = np.random.default_rng(seed).permutation(prompts)[:n_val]
    is_val = np.isin(pairs.prompt_id, val_prompts)
    return pairs.subset(~is_val), pairs.subset(is_val)


class PairDataset(Dataset):
    def __init__(self, pairs: Pairs) -> None:
        self.pairs = pairs
        self.relative = pairs.relative_position()
        self.prompt_index = np.unique(pairs.prompt_id, return_inverse=True)[1]  # 0..prompts-1, for the bootstrap

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pairs
        return {"prompt": p.prompt[i], "prefix": p.completion[i][: p.split[i]], "split": p.split[i],
                **{key: values[i] for key, values in p.targets().items()},
                "relative": self.relative[i], "index": p.index[i], "prompt_index": self.prompt_index[i]}


TARGETS = ("z1", "z2", "r1", "r2", "p", "binary")  # what the likelihoods read


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Token ids stay lists (the network batches them itself, one forward per distinct prompt)."""
    batch: dict[str, Any] = {"prompt": [item["prompt"] for item in items], "prefix": [item["prefix"] for item in items]}
    for key in (*TARGETS, "relative"):
        batch[key] = torch.tensor(np.array([item[key] for item in items]), dtype=torch.float32)
    for key in ("split", "index", "prompt_index"):
        batch[key] = torch.tensor(np.array([item[key] for item in items]), dtype=torch.long)
    return batch


class PairDataModule(L.LightningDataModule):
    """Reads the dump once (``setup`` is idempotent) and serves batches of pairs, each rank its own shard."""

    def __init__(self, rollouts: str | Path, reward_key: str = "reward", group_stats: str = "prompt",
                 val_fraction: float = 0.1, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.rollouts, self.reward_key, self.group_stats = rollouts, reward_key, group_stats
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed
        self.train: Pairs | None = None
        self.val: Pairs | None = None
        self.counts: dict[str, int] = {}
        self.reward_column = ""

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        pairs, self.counts, self.reward_column = load_pairs(self.rollouts, self.reward_key, self.group_stats)
        self.train, self.val = split_by_prompt(pairs, self.val_fraction, self.seed)
        self.counts.update(pairs_train=len(self.train), pairs_val=len(self.val),
                           prompts_train=len(np.unique(self.train.prompt_id)),
                           prompts_val=len(np.unique(self.val.prompt_id)))
        log.info("pairs: %s", ", ".join(f"{k}={v}" for k, v in self.counts.items()))

    def max_token_id(self) -> int:
        return max(int(seq.max(initial=0)) for part in (self.train, self.val)
                   for seq in (*part.prompt, *part.completion))

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.train), *self._rank_world(), seed=self.seed, shuffle=True)
        return DataLoader(PairDataset(self.train), batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.val), *self._rank_world(), seed=self.seed, shuffle=False)
        return DataLoader(PairDataset(self.val), batch_size=self.batch_size, sampler=sampler, collate_fn=collate)
