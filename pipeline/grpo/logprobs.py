"""Per-token log-probs (and entropies) of completion tokens, without the full-vocabulary block of logits.

The (B, T, vocabulary) logits are a GRPO step's largest tensor: with their fp32 copies and backward
about 22 bytes per element, 27 GB for 8 completions of 1,024 tokens at Qwen's 151,936 tokens. Here the
model runs as usual (``logits_to_keep`` = T + 1, so only completion positions reach the head), but
for the duration of the call its LM head returns the selected-token log-probs instead of logits,
computing the logits of ``chunk_size`` positions at a time. With gradients each chunk sits under
activation checkpointing, so backward recomputes one chunk's logits at a time as well: no more than
one chunk's logits ever exist. The head runs inside the model's forward, so Fabric's autocast,
DDP and FSDP (the head in the root unit) see an ordinary forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.generation.weights import hf_module
from pipeline.importance.context_head import ContextInputs, token_features

DEFAULT_CHUNK_SIZE = 512  # completion positions per head chunk: 512 x 151,936 fp32 logits = 311 MB
STATE_KINDS = ("none", "completion", "context")  # what completion_outputs hands out beside the log-probs
POST_HEAD_SCALING = ("final_logit_softcapping", "logit_scale")  # configs whose logits change after the head


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` used when sampling the completions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _selected_logprobs(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, temperature: float,
                       with_entropy: bool) -> tuple[Tensor, ...]:
    """log softmax(head(hidden) / T)[target] of each row, and its entropy (no gradient) if asked."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = logits.logsumexp(-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return (logps,)
    with torch.no_grad():  # H = log Z - sum p * logit, the dot product without a (rows, vocabulary) temporary
        entropy = log_norm - torch.einsum("rv,rv->r", logits.softmax(-1), logits)
    return logps, entropy


class ChunkedHead:
    """Stands in for the LM head's ``forward`` during one call: hidden states in, (B, T) log-probs out."""

    def __init__(self, head_forward: Callable[[Tensor], Tensor], targets: Tensor, temperature: float,
                 chunk_size: int, with_entropy: bool, with_states: bool = False):
        self.head_forward, self.targets, self.temperature = head_forward, targets, temperature
        self.chunk_size, self.with_entropy, self.with_states = chunk_size, with_entropy, with_states
        self.entropies: Tensor | None = None
        self.states: Tensor | None = None

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.with_states:
            self.states = hidden.detach()
        hidden = hidden[:, :-1]  # the last position predicts past the completion
        batch, length = self.targets.shape
        rows, targets = hidden.reshape(batch * length, -1), self.targets.reshape(-1)
        size = self.chunk_size if self.chunk_size > 0 else max(len(rows), 1)
        recompute = torch.is_grad_enabled() and rows.requires_grad and size < len(rows)
        parts = []
        for start in range(0, len(rows), size):
            args = (self.head_forward, rows[start:start + size], targets[start:start + size], self.temperature,
                    self.with_entropy)
            parts.append(checkpoint(_selected_logprobs, *args, use_reentrant=False) if recompute
                         else _selected_logprobs(*args))
        logps = torch.cat([p[0] for p in parts]).view(batch, length)
        if self.with_entropy:
            self.entropies = torch.cat([p[1] for p in parts]).view(batch, length)
        return logps


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head inside Fabric's, DDP's and PEFT's wrappers."""
    inner = hf_module(model)
    config = getattr(inner, "config", None)
    for name in POST_HEAD_SCALING:
        if getattr(config, name, None) is not None:
            raise ValueError(f"models whose logits are rescaled after the LM head ({name}) are not supported")
    return inner.get_output_embeddings()


@contextmanager
def _head_replaced(head: torch.nn.Module, replacement: Callable[[Tensor], Tensor]) -> Iterator[None]:
    previous = head.__dict__.get("forward")  # an instance-level forward set by someone else (e.g. accelerate)
    head.forward = replacement
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def completion_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_len: int,
                        temperature: float = 1.0, with_entropy: bool = False,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs of the last ``completion_len`` tokens (and their entropies, without grad).

    Logits are divided by the sampling temperature, as TRL does, so the ratio compares the policy
    with the distribution the completions were drawn from. ``chunk_size`` <= 0: all positions in
    one block, without recomputation (the old, memory-hungry way; the benchmark's baseline).
    """
    logps, entropies, _ = completion_outputs(model, input_ids, attention_mask, completion_len, temperature,
                                             with_entropy, chunk_size)
    return logps, entropies


def completion_outputs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_len: int,
                       temperature: float = 1.0, with_entropy: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       states: str = "none") -> tuple[Tensor, Tensor | None, Tensor | ContextInputs | None]:
    """``completion_logprobs``, plus (``states``, one of STATE_KINDS) the hidden states the forward computed, detached.

    ``completion``: (B, T + 1, H), entry t the last hidden state at the last token of prompt + completion[:t],
    where a token head reads f(t) (docs/importance.md). ``context``: the context head's inputs
    (``token_features`` of every real token of prompt + completion, right-padded), as stage 2's
    ``states.context_features`` computes them with its own forward. Both come out of the loss's forward, so
    an online importance head costs no second model and no extra pass; detached, its fit never reaches the
    policy.
    """
    head = output_head(model)
    chunked = ChunkedHead(head.forward, input_ids[:, -completion_len:], temperature, chunk_size, with_entropy,
                          states == "completion")
    captured: list[Tensor] = []  # the decoder's last hidden states at every position (logits_to_keep cuts the head's)
    hook = (hf_module(model).get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0].detach()))
            if states == "context" else None)
    try:
        with _head_replaced(head, chunked):
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_for(attention_mask), logits_to_keep=completion_len + 1,
                        use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    if states == "context":
        return out.logits, chunked.entropies, _context_inputs(model, captured[0], input_ids, attention_mask,
                                                              completion_len)
    return out.logits, chunked.entropies, chunked.states


def _context_inputs(model: torch.nn.Module, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    completion_len: int) -> ContextInputs:
    """The context head's inputs from the forward's last hidden states at every position (B, P + T, H): each
    row's left padding moved to its end, so that it reads as stage 2's right-padded prompt + completion."""
    order = (attention_mask == 0).to(torch.uint8).argsort(dim=1, stable=True)  # real tokens first, in order

    def moved(x: Tensor) -> Tensor:
        return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    with torch.no_grad():
        embeddings = hf_module(model).get_input_embeddings()(input_ids)
    lengths = attention_mask.sum(1)
    features = token_features(moved(hidden), moved(embeddings).to(hidden.dtype))
    real = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths[:, None]
    prompt_lengths = attention_mask[:, : input_ids.shape[1] - completion_len].sum(1)
    return ContextInputs(features * real.unsqueeze(-1).to(features.dtype), lengths, prompt_lengths)
