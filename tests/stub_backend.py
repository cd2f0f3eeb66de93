"""A generation backend with a known length law: each token stops with probability ``stop_prob``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.generation.base import Completion, Request, SamplingParams

STOP = 2


class GeometricBackend:
    """Completions end with the stop token ``STOP`` when they stop within budget, as the real backends' do."""

    def __init__(self, stop_prob: float = 0.08, vocab: int = 50):
        self.stop_prob = stop_prob
        self.vocab = vocab

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        out = []
        for r in requests:
            rng = np.random.default_rng(r.seed)
            length = int(rng.geometric(self.stop_prob))  # tokens up to and including the stop token
            if length <= r.max_new_tokens:
                out.append(Completion(rng.integers(3, self.vocab, size=length - 1).tolist() + [STOP], "stop"))
            else:
                out.append(Completion(rng.integers(3, self.vocab, size=r.max_new_tokens).tolist(), "length"))
        return out
