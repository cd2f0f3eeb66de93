"""Online importance: f read from the live policy's own hidden states, refit every k steps on recent pairs.

Stage 2 fits f once, on the initial model's rollouts, and the offline soft mask then pays a second
model's forward per completion while the policy drifts from what f was fitted on. Here stage 2's
head (``NetConfig``: form, pinned ends, features) reads the hidden states that the policy's
log-prob forward already computed (``completion_outputs``), detached, so its fit never reaches the
policy; it is refit by the stage-2 pair likelihood on a replay buffer of the run's most recent pairs
(groups drawn as sister pairs, ``paired_rollout``). Stage 2's rules hold: m_q and v_q pooled per
prompt (here over the buffer), held-out pairs by prompt, the gain over the best constant f with a
bootstrap CI over held-out prompts (``ValidationStats``). Until the head beats the constant there
(the offline guard's rule, ``gain_is_positive``, over at least ``--online_min_heldout_prompts`` held-out
prompts), the loss weights fall back to uniform.
Maths and options: docs/online_importance.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.grpo.config import ONLINE_FEATURES
from pipeline.grpo.importance_guard import gain_is_positive
from pipeline.grpo.paired_rollout import Pairing
from pipeline.grpo.softmask import soft_mask_weights, weight_stats
from pipeline.importance.config import ImportanceArgs
from pipeline.importance.context_head import ContextInputs
from pipeline.importance.data import TARGETS, VAR_EPS
from pipeline.importance.forms import curve, f_along
from pipeline.importance.loss import LIKELIHOODS, best_constant_f, resolve_likelihood
from pipeline.importance.metrics import ValidationStats
from pipeline.importance.model import (
    NetConfig,
    context_head_f,
    context_pair_f,
    head_inputs,
    head_logits,
    make_head,
    start_head,
)
from pipeline.importance.train import starting_point

if TYPE_CHECKING:
    from pipeline.grpo.config import GRPOArgs

log = logging.getLogger(__name__)
HELDOUT_STREAM = 0x4E1D  # the held-out prompts' random stream, apart from every sampling seed
SPLIT_QUANTILE = 0.9  # t_max: this quantile of the buffer's sister-A lengths (stage 1's default rule)
META = {"prompt_id": torch.long, "r1": torch.float64, "r2": torch.float64, "split": torch.long,
        "length": torch.long, "degenerate": torch.bool, "step": torch.long}  # length: sister A's tokens


@dataclass(frozen=True)
class OnlineOptions:
    refit_every: int = 1  # steps between refits; 0: never (a warm-started head, judged only)
    buffer_size: int = 1024  # pairs kept, the most recent
    refit_iters: int = 25  # full-batch AdamW steps per refit
    lr: float = 1e-2
    weight_decay: float = 0.01
    state_l2: float = 0.1  # ridge on the head's weights on the hidden state: content must earn its place over position
    heldout_fraction: float = 0.2  # share of prompts whose pairs only judge the head
    min_heldout_prompts: int = 4  # fewer held-out prompts give no usable bootstrap CI: the head is not judged yet
    likelihood: str = "auto"  # stage 2's rule: bernoulli on 0/1 prompts, gaussian on the others; or one of LIKELIHOODS
    seed: int = 0
    features: str = ONLINE_FEATURES[0]  # the head without a warm start (a stage-2 export brings its own)
    max_grad_norm: float = ImportanceArgs.max_grad_norm  # stage 2's clip of each refit step's gradient; 0: none


class PairBuffer:
    """The run's most recent ``capacity`` pairs: prompt, rewards, split, A's length, step, and the states f(t) reads.

    A pair's states are the policy's hidden states that its f(t) reads, as the step's forward saw them:
    the state at u = t for the direct form, those at u = 1..t for the monotone one (none when t = 0,
    where f is pinned to 0, or for a degenerate pair, which carries no information).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.meta = {name: torch.empty(0, dtype=dtype) for name, dtype in META.items()}
        self.states: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.states)

    def add(self, meta: dict[str, Tensor], states: list[Tensor]) -> None:
        keep = slice(max(len(self) + len(states) - self.capacity, 0), None)
        self.meta = {name: torch.cat([self.meta[name], meta[name].cpu().to(dtype)])[keep]
                     for name, dtype in META.items()}
        self.states = (self.states + states)[keep]

    def state_dict(self) -> dict[str, Any]:
        return {"meta": dict(self.meta), "states": list(self.states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta, self.states = dict(state["meta"]), list(state["states"])


def pooled_targets(meta: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Stage 2's targets of every pair, m_q and v_q pooled per prompt over the buffer; which pairs are informative.

    Stage 2's ``--group_stats prompt`` rule: every finite reward of the prompt counts (both sisters,
    degenerate pairs too), v_q with ddof = 1. Informative: not degenerate, finite rewards, v_q > VAR_EPS.
    """
    r1, r2 = meta["r1"].double(), meta["r2"].double()
    prompts, inverse = torch.unique(meta["prompt_id"], return_inverse=True)
    rewards, owner = torch.cat([r1, r2]), torch.cat([inverse, inverse])
    finite = rewards.isfinite()
    values = torch.where(finite, rewards, 0.0)
    count = torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, owner, finite.double())
    mean = torch.zeros_like(count).index_add_(0, owner, values) / count.clamp(min=1)
    square = torch.where(finite, (values - mean[owner]).square(), 0.0)
    var = torch.zeros_like(count).index_add_(0, owner, square) / (count - 1).clamp(min=1)
    m, v = mean[inverse], torch.where(count[inverse] > 1, var[inverse], 0.0)
    graded = torch.zeros_like(count).index_add_(0, owner, (finite & (rewards != 0) & (rewards != 1)).double())
    informative = ~meta["degenerate"] & r1.isfinite() & r2.isfinite() & (v > VAR_EPS)
    std = v.clamp(min=VAR_EPS).sqrt()
    targets = {"z1": (r1 - m) / std, "z2": (r2 - m) / std, "r1": r1, "r2": r2, "p": m,
               "binary": (graded[inverse] == 0).double()}
    return targets, informative


@functools.lru_cache(maxsize=1 << 16)
def _held_out(seed: int, prompt: int, fraction: float) -> bool:
    return bool(np.random.default_rng([seed, prompt, HELDOUT_STREAM]).random() < fraction)


def heldout_prompts(prompt_ids: Tensor, seed: int, fraction: float) -> Tensor:
    """Whether each pair's prompt is held out: a fixed draw per (seed, prompt), whatever step it comes in."""
    return torch.tensor([_held_out(seed, p, fraction) for p in prompt_ids.tolist()], dtype=torch.bool)


class TokenOnlineHead(nn.Module):
    """Stage 2's token head and form (``NetConfig``: form, pinned end, position features) on the policy's state of
    one completion token at a time (``completion_outputs``' ``completion`` states)."""

    reads = "completion"

    def __init__(self, hidden_size: int, config: NetConfig) -> None:
        super().__init__()
        self.config, self.hidden_size, self.row_width = config, hidden_size, hidden_size
        self.head = make_head(hidden_size, config)

    def state_norm(self) -> Tensor:
        """Squared norm of the first layer's weights on the hidden state (not on the position basis)."""
        first = self.head if isinstance(self.head, nn.Linear) else self.head[0]
        width = self.hidden_size if "state" in self.config.features else 0
        return first.weight[:, :width].square().sum()

    def curve(self, states: Tensor, lengths: Tensor, width: int) -> Tensor:
        """(B, T + 1) f(0..T) from the states (B, T + 1, H) of right-padded completions of ``lengths`` tokens
        (``width`` = T, which the states already give: the context head's argument)."""
        u = torch.arange(1, states.size(1), device=states.device).expand(states.size(0), -1)
        logits = head_logits(self.head, states[:, 1:].float(), u, self.config.features)
        return curve(f_along(self.config.form, logits), lengths, self.config.pin_end)

    def capture(self, states: Tensor, row: int, t: int) -> Tensor:
        """What f(t) of this row reads, kept for the buffer: the state at u = t (direct), at u = 1..t (monotone)."""
        return states[row, (1 if self.config.form == "monotone" else t):t + 1].clone()

    def pair_inputs(self, rows: list[Tensor], split: Tensor) -> dict[str, Tensor]:
        """The pairs' kept states flattened, with each state's pair and completion position u (computed once per
        refit): ``pair_f``'s input."""
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long, device=split.device)
        pair = torch.repeat_interleave(torch.arange(len(rows), device=split.device), counts)
        first = counts.cumsum(0) - counts
        u = split[pair] - counts[pair] + 1 + torch.arange(len(pair), device=split.device) - first[pair]  # last: t
        states = torch.cat(rows).float() if rows else torch.empty(0, self.hidden_size, device=split.device)
        return {"inputs": head_inputs(states, u, self.config.features), "state_pair": pair, "u": u}

    def pair_f(self, inputs: dict[str, Any], split: Tensor) -> Tensor:
        """f(t) of each pair at its split t; 0 at t = 0."""
        logits = torch.full((len(split), max(int(split.max()), 1)), float("-inf"), device=split.device)
        logits = logits.index_put((inputs["state_pair"], inputs["u"] - 1), self.head(inputs["inputs"]).squeeze(-1))
        f = f_along(self.config.form, logits).gather(1, (split - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # -inf: 0
        return torch.where(split > 0, f, torch.zeros_like(f))


class ContextOnlineHead(nn.Module):
    """Stage 2's context head (``--features context``: its own attention block over prompt + completion) on the
    policy's states and input embeddings of every token (``completion_outputs``' ``context`` inputs)."""

    reads = "context"

    def __init__(self, hidden_size: int, config: NetConfig) -> None:
        super().__init__()
        self.config, self.row_width = config, 2 * hidden_size
        self.head = make_head(hidden_size, config)

    def state_norm(self) -> Tensor:
        """Squared norm of the block's input weights on the token features."""
        return self.head.inp.weight.square().sum()

    def curve(self, inputs: ContextInputs, lengths: Tensor, width: int) -> Tensor:
        """(B, T + 1) f(0..T), T = ``width``, of right-padded completions of ``lengths`` tokens."""
        f = context_head_f(self.head, self.config.form, inputs.features, inputs.lengths, inputs.prompt_lengths, width)
        return curve(f, lengths, self.config.pin_end)

    def capture(self, inputs: ContextInputs, row: int, t: int) -> Tensor:
        """What f(t) of this row reads, kept for the buffer: the features of prompt + completion[:t]."""
        return inputs.features[row, : int(inputs.prompt_lengths[row]) + t].clone()

    def pair_inputs(self, rows: list[Tensor], split: Tensor) -> dict[str, Any]:
        """The pairs' kept rows (prompt + A[:t]) and their prompts' lengths: ``pair_f``'s input."""
        prompt_lengths = torch.tensor([len(r) for r in rows], device=split.device) - split
        return {"rows": [r.float() for r in rows], "prompt_lengths": prompt_lengths}

    def pair_f(self, inputs: dict[str, Any], split: Tensor) -> Tensor:
        """f(t) of each pair at its split t; 0 at t = 0."""
        return context_pair_f(self.head, self.config.form, inputs["rows"], inputs["prompt_lengths"], split)


def fresh_config(features: str) -> NetConfig:
    """The online head's design without a warm start: stage 2's defaults, the token head linear (measured:
    docs/online_importance.md)."""
    return NetConfig(backbone="policy", features=features, head_hidden=NetConfig.head_hidden if features == "context" else 0)


def online_head(hidden_size: int, config: NetConfig) -> TokenOnlineHead | ContextOnlineHead:
    """The head that runs ``config``'s features on the policy's states."""
    return (ContextOnlineHead if config.features == "context" else TokenOnlineHead)(hidden_size, config)


def warm_start(export: str | Path, hidden_size: int, fingerprint: dict[str, Any]) -> tuple[NetConfig, dict | None]:
    """A stage-2 export's design and head weights (None when its chosen candidate was the constant f)."""
    from pipeline.importance.export import CONFIG_FILE, WEIGHTS_FILE

    path = Path(export)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"'{path}' is not an importance-net export (no {CONFIG_FILE}): pass <run>/export")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("tokenizer") != fingerprint:
        raise UserError(f"importance net '{path}' was trained with another tokenizer than the policy: "
                        "train it on a dump of this model, or drop --importance_net to start from a constant")
    config = NetConfig(**info["net"])
    weights = {name.removeprefix("head."): tensor for name, tensor in load_file(path / WEIGHTS_FILE).items()
               if name.startswith("head.")}
    expected = make_head(hidden_size, config).state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in expected.items()}:
        raise UserError(f"importance net '{path}' has a head for other hidden states than the policy's "
                        f"({hidden_size} wide): warm-start only from an export of this model")
    if config.constant is not None:
        log.info("importance net '%s' kept the constant f: the online head starts from the constant", path)
        return config, None
    if config.backbone_mode != "frozen":
        log.warning("warning: importance net '%s' trained its backbone; its head starts the online head on "
                    "the policy's own states all the same (uniform weights until it beats the constant)", path)
    return config, weights


class OnlineImportance:
    """The head, its optimizer, the pair buffer and the fallback switch; everything ``state_dict`` holds."""

    def __init__(self, hidden_size: int, options: OnlineOptions, device: torch.device | str,
                 config: NetConfig | None = None, head_weights: dict[str, Tensor] | None = None) -> None:
        self.options = options
        self.head = online_head(hidden_size, config or fresh_config(options.features)).to(device)
        if head_weights is not None:
            self.head.head.load_state_dict(head_weights)
        else:
            start_head(self.head.head, self.head.config.form, 0.1)  # a placeholder until the first refit
        named = list(self.head.named_parameters())  # as stage 2: weight decay on weights, never on biases
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": options.weight_decay},
             {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}], lr=options.lr)
        self.buffer = PairBuffer(options.buffer_size)
        self.started = head_weights is not None  # False: the first refit starts the head at the best constant
        self.fallback = True
        self._captured: dict[int, Tensor] = {}
        self._head_weights: list[Tensor] = []
        self._lengths = torch.empty(0, dtype=torch.long)

    def split_limit(self, max_new_tokens: int) -> int:
        """t_max for the next step: stage 1's length quantile, over the sister As of earlier steps (in the
        buffer), so t never depends on the sister it splits; ``max_new_tokens`` before the first step."""
        lengths = self.buffer.meta["length"]
        if not len(lengths):
            return max_new_tokens
        return int(min(math.ceil(float(torch.quantile(lengths.double(), SPLIT_QUANTILE))), max_new_tokens))

    # ---- during the step's forward ---------------------------------------------------------------
    def weights_hook(self, softmask: str, strength: float, mask: Tensor, lengths: Tensor,
                     pairing: Pairing) -> Callable[[Tensor | ContextInputs, slice], Tensor]:
        """``accumulate``'s ``weights_from_states``: a micro-batch's weights, from its own forward's states
        (``completion_outputs``' states of kind ``state_kind``).

        Also keeps the states each pair's f(t) reads for the buffer, and the head's own weights for the
        log (what it would do while the fallback is on).
        """
        self._captured, self._head_weights, self._head_f, self._lengths = {}, [], [], lengths.cpu()

        def hook(states: Tensor | ContextInputs, rows: slice) -> Tensor:
            part_mask = mask[rows]
            with torch.no_grad():
                f = self.head.curve(states, lengths[rows], part_mask.shape[1])
            head_weights = soft_mask_weights(softmask, part_mask, strength, f=f)
            self._head_weights.append(head_weights)
            self._head_f.append(f)
            for row in range(rows.start + rows.start % 2, rows.stop, 2):  # sister A rows of this micro-batch
                t = int(pairing.split[row])
                if t > 0 and not pairing.degenerate[row]:
                    self._captured[row] = self.head.capture(states, row - rows.start, t)
            return soft_mask_weights("none", part_mask) if self.fallback else head_weights

        return hook

    @property
    def state_kind(self) -> str:
        """The states ``weights_hook``'s hook reads (``logprobs.STATE_KINDS``)."""
        return self.head.reads

    def step_curves(self) -> Tensor:
        """The head's f(0..T) of each of this step's completions (the credit task's log compares it with the truth)."""
        return torch.cat(self._head_f)

    # ---- after the step ----------------------------------------------------------------------------
    def end_step(self, step: int, prompt_ids: list[int], rewards: np.ndarray, pairing: Pairing, mask: Tensor,
                 gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Add the step's pairs (every rank's, through ``gather``) to the buffer, refit when due, judge the head.

        ``step`` counts from 1. Returns the logged ``online/*`` metrics; the fallback they report holds
        for the next step's weights.
        """
        rows = pairing.pair_rows()
        meta = {"prompt_id": torch.tensor(prompt_ids)[rows], "r1": torch.as_tensor(rewards)[rows],
                "r2": torch.as_tensor(rewards)[rows + 1], "split": pairing.split[rows], "length": self._lengths[rows],
                "degenerate": pairing.degenerate[rows], "step": torch.full((len(rows),), step)}
        width = self.head.row_width
        states = [self._captured.get(int(r), torch.empty(0, width, device=mask.device)) for r in rows]
        if gather is not None:
            meta, states = _gathered(meta, states, width, mask.device, gather)
        self.buffer.add(meta, states)
        concentration = (weight_stats(torch.cat(self._head_weights), mask)["top20_mass"] if self._head_weights
                         else float("nan"))
        if self.options.refit_every and step % self.options.refit_every == 0:
            self.refit()
        judged = self.judge()
        self.fallback = not gain_is_positive(judged if np.isfinite(judged["gain"]) else None)
        if gather is not None:
            self._check_agreement(step, mask.device, gather)
        lo, hi = judged["gain_ci95"]
        return {"online/buffer_pairs": float(len(self.buffer)), "online/train_pairs": judged["train_pairs"],
                "online/heldout_pairs": float(judged["pairs"]), "online/loss": judged["loss"],
                "online/baseline_loss": judged["baseline_loss"], "online/gain": judged["gain"],
                "online/gain_lo": lo, "online/gain_hi": hi, "online/fallback": float(self.fallback),
                "online/top20_mass": concentration}

    def _check_agreement(self, step: int, device: torch.device, gather: Callable[[Tensor], Tensor]) -> None:
        """Every rank refit the same head on the same buffer: fail loudly if the heads or switches differ."""
        mine = torch.stack([torch.cat([p.detach().double().flatten() for p in self.head.parameters()]).sum(),
                            torch.tensor(float(self.fallback), dtype=torch.float64),
                            torch.tensor(float(len(self.buffer)), dtype=torch.float64)]).to(device)
        every = gather(mine.unsqueeze(0))
        if not torch.equal(every, mine.unsqueeze(0).expand_as(every)):
            raise RuntimeError(f"online importance heads diverged across ranks at step {step}")

    def _split(self) -> tuple[Tensor, Tensor, str]:
        """Training and held-out pairs (the informative ones, by prompt) and the likelihood for these rewards."""
        meta = self.buffer.meta
        targets, informative = pooled_targets(meta)
        held = heldout_prompts(meta["prompt_id"], self.options.seed, self.options.heldout_fraction)
        binary = targets["binary"].numpy() > 0.5
        return informative & ~held, informative & held, resolve_likelihood(self.options.likelihood, binary, "reward")

    def _batch(self, which: Tensor) -> dict[str, Any]:
        """Buffer pairs ``which`` (bool) as stage 2's validation batch, plus what the head reads of them
        (``head``: its ``pair_inputs``, computed once per refit)."""
        index = which.nonzero().squeeze(1)
        targets, _ = pooled_targets(self.buffer.meta)
        split, length = self.buffer.meta["split"][index], self.buffer.meta["length"][index]
        batch = {**{k: targets[k][index] for k in TARGETS}, "split": split,
                 "prompt_index": torch.unique(self.buffer.meta["prompt_id"][index], return_inverse=True)[1],
                 "relative": split / length.clamp(min=1)}
        device = next(self.head.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["head"] = self.head.pair_inputs([self.buffer.states[i].to(device) for i in index.tolist()],
                                              batch["split"])
        return batch

    def _pair_f(self, batch: dict[str, Any]) -> Tensor:
        return self.head.pair_f(batch["head"], batch["split"])

    def _baseline(self, likelihood: str, train: Tensor) -> float:
        """Stage 2's baseline: the best constant f for t > 0 on the training pairs (f(0) = 0 is pinned for all)."""
        targets, _ = pooled_targets(self.buffer.meta)
        moved = train & (self.buffer.meta["split"] > 0)
        return best_constant_f(likelihood, {k: targets[k][moved] for k in TARGETS})

    def _starting_point(self, batch: dict[str, Tensor], likelihood: str) -> tuple[float, float]:
        """Stage 2's (best constant f, the head's starting value) on these pairs."""
        return starting_point(self.head.config.form, likelihood, batch["split"].cpu().numpy(),
                              {k: batch[k].cpu().numpy() for k in TARGETS})

    def refit(self) -> None:
        """``refit_iters`` full-batch AdamW steps of the pair likelihood on the training pairs (deterministic)."""
        train, _, likelihood = self._split()
        if not bool((train & (self.buffer.meta["split"] > 0)).any()):
            return
        batch = self._batch(train)
        if not self.started:
            start_head(self.head.head, self.head.config.form, self._starting_point(batch, likelihood)[1])
            self.started = True
        for _ in range(self.options.refit_iters):
            self.optimizer.zero_grad(set_to_none=True)
            loss = LIKELIHOODS[likelihood](self._pair_f(batch), batch).mean()
            (loss + self.options.state_l2 * self.head.state_norm()).backward()
            if self.options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.options.max_grad_norm)
            self.optimizer.step()

    @torch.no_grad()
    def judge(self) -> dict[str, Any]:
        """Stage 2's validation on the held-out pairs: the head's and the best constant's loss, the gain, its CI."""
        train, held, likelihood = self._split()
        held_prompts = len(torch.unique(self.buffer.meta["prompt_id"][held]))
        if held_prompts < self.options.min_heldout_prompts or not bool((train & (self.buffer.meta["split"] > 0)).any()):
            nan = float("nan")
            return {"loss": nan, "baseline_loss": nan, "gain": nan, "gain_ci95": [nan, nan],
                    "pairs": int(held.sum()), "train_pairs": float(train.sum())}
        baseline_f = self._baseline(likelihood, train)
        batch = self._batch(held)
        stats = ValidationStats(likelihood, baseline_f, int(batch["prompt_index"].max()) + 1, batch["split"].device)
        stats.update(self._pair_f(batch), batch)
        return {**stats.summary(), "train_pairs": float(train.sum())}

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "started": self.started, "fallback": self.fallback}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.started, self.fallback = state["started"], state["fallback"]


def _gathered(meta: dict[str, Tensor], states: list[Tensor], width: int, device: torch.device,
              gather: Callable[[Tensor], Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Every rank's pairs, in rank order, so that every rank's buffer, hence its head, is the same.

    ``gather`` concatenates a tensor of every rank along dim 0; states are padded to the most rows any
    rank's pair has, and cut back to each pair's own count after.
    """
    counts = gather(torch.tensor([len(s) for s in states], device=device))
    rows = max(int(counts.max()), 1)
    padded = torch.zeros(len(states), rows, width, device=device,
                         dtype=next((s.dtype for s in states if len(s)), torch.float32))
    for i, s in enumerate(states):
        padded[i, :len(s)] = s
    padded = gather(padded)
    meta = {name: gather(value.to(device, torch.uint8 if value.dtype == torch.bool else value.dtype)).cpu()
            for name, value in meta.items()}  # bool as uint8: not every backend gathers bool
    return meta, [padded[i, :int(n)] for i, n in enumerate(counts.tolist())]


def from_args(args: GRPOArgs, hidden_size: int, tokenizer: Any, device: torch.device) -> OnlineImportance:
    """Stage 3's online importance: stage 2's default head, or ``--importance_net``'s design and head."""
    from pipeline.dump import tokenizer_fingerprint

    options = OnlineOptions(args.online_refit_every, args.online_buffer_size, args.online_refit_iters, args.online_lr,
                            state_l2=args.online_state_l2, heldout_fraction=args.online_heldout_fraction,
                            min_heldout_prompts=args.online_min_heldout_prompts,
                            likelihood=args.online_likelihood, seed=args.seed, features=args.online_features)
    if not args.importance_net:
        return OnlineImportance(hidden_size, options, device)
    config, weights = warm_start(args.importance_net, hidden_size, tokenizer_fingerprint(tokenizer))
    return OnlineImportance(hidden_size, options, device, config, weights)
