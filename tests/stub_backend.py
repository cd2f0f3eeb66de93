"""A generation backend with a known length law: each token stops with probability ``stop_prob``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.generation.base import Completion, Request, SamplingParams


class GeometricBackend:
    def __init__(self, stop_prob: float = 0.08, vocab: int = 50):
        self.stop_prob = stop_prob
        self.vocab = vocab

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        out = []
        for r in requests:
            rng = np.random.default_rng(r.seed)
            length = int(rng.geometric(self.stop_prob)) - 1  # tokens before the stop token
            tokens = rng.integers(3, self.vocab, size=min(length, r.max_new_tokens)).tolist()
            out.append(Completion(tokens, "stop" if length < r.max_new_tokens else "length"))
        return out
