"""The interface every generation backend implements: token ids in, token ids out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Completion:
    token_ids: list[int]  # ends with the stop token when finish_reason == "stop" (as TRL's completions)
    finish_reason: str  # "stop" or "length"
    # the sampler's log-prob of each token (vLLM), for the importance-sampling correction; None: not given
    logprobs: list[float] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int  # per request, so backends that can seed requests individually never repeat samples


class GenerationBackend(Protocol):
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        """One completion per request, in order; ``params.max_new_tokens`` is ignored in favour of
        each request's own budget."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from ``model``'s current weights (called after each optimizer step)."""
        ...
