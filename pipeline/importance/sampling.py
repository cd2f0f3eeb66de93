"""Which pairs each rank sees: a fixed shard per rank, reshuffled within itself every epoch.

torch's DistributedSampler reshuffles all pairs across ranks every epoch, so with a frozen backbone
each rank ends up computing features for most pairs (~94% after 10 epochs on 2 ranks). A fixed shard
means each pair's features are computed once, on one rank. Training shards are padded with a few of
their own pairs to equal length (DDP steps in lockstep); validation shards are not padded, so every
validation pair is counted exactly once when the ranks add their sums.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    def __init__(self, size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = np.random.default_rng(seed).permutation(size) if shuffle else np.arange(size)
        self.shard = order[rank::world]
        self.length = -(-size // world) if shuffle else len(self.shard)  # training: every rank equally long

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start: a new order within the same shard."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        shard = self.shard
        if self.shuffle:
            shard = np.random.default_rng([self.seed, self.epoch]).permutation(shard)
        if len(shard) == 0:
            return iter([])
        return iter(np.resize(shard, self.length).tolist())
