"""Online importance: f read from the live policy's own hidden states, refit every k steps on recent pairs.

Stage 2 fits f once, on the initial model's rollouts, and the offline soft mask then pays a second
model's forward per completion while the policy drifts from what f was fitted on. Here a small head
reads the hidden states that the policy's log-prob forward already computed (``completion_outputs``),
detached, so its fit never reaches the policy; it is refit by the stage-2 pair likelihood on a replay
buffer of the run's most recent pairs (groups drawn as sister pairs, ``paired_rollout``). Stage 2's
rules hold: m_q and v_q pooled per prompt (here over the buffer), f(0) = 0 and f(len) = 1 pinned,
held-out pairs by prompt, and the gain over the best constant f with a bootstrap CI over held-out
prompts. Until the head beats the constant there (the rule of the offline guard, ``gain_is_positive``),
the loss weights fall back to uniform. Maths and options: docs/online_importance.md.
"""

from __future__ import annotations

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
from pipeline.grpo.importance_guard import gain_is_positive
from pipeline.grpo.paired_rollout import Pairing
from pipeline.grpo.softmask import soft_mask_weights, weight_stats
from pipeline.importance.data import VAR_EPS
from pipeline.importance.loss import F_MAX, best_constant_f, pair_nll

if TYPE_CHECKING:
    from pipeline.grpo.config import GRPOArgs

log = logging.getLogger(__name__)
HELDOUT_STREAM = 0x4E1D  # the held-out prompts' random stream, apart from every sampling seed
BOOTSTRAP_SAMPLES = 2000
META = {"prompt_id": torch.long, "r1": torch.float64, "r2": torch.float64, "split": torch.long,
        "length": torch.long, "degenerate": torch.bool, "step": torch.long}  # length: sister A's tokens
SPLIT_QUANTILE = 0.9  # t_max: this quantile of the buffer's sister-A lengths (stage 1's default rule)


@dataclass(frozen=True)
class OnlineOptions:
    refit_every: int = 1  # steps between refits
    buffer_size: int = 1024  # pairs kept, the most recent
    refit_iters: int = 25  # full-batch AdamW steps per refit
    lr: float = 1e-2
    weight_decay: float = 0.01
    heldout_fraction: float = 0.2  # share of prompts whose pairs only judge the head
    head_hidden: int = 0  # 0: a linear head; > 0: one hidden layer of that width
    seed: int = 0


class PairBuffer:
    """The run's most recent ``capacity`` pairs: prompt, rewards, split, A's length, step, and the states f(t) reads.

    A pair's states are the policy's hidden state at its split t (one row; none when t = 0, where f is
    pinned to 0, or for a degenerate pair, which carries no information), as the step's forward saw it.
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
    """Standardised rewards of every pair, with m_q and v_q pooled per prompt over the buffer; informative pairs.

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
    informative = ~meta["degenerate"] & r1.isfinite() & r2.isfinite() & (v > VAR_EPS)
    std = v.clamp(min=VAR_EPS).sqrt()
    return {"z1": (r1 - m) / std, "z2": (r2 - m) / std, "r1": r1, "r2": r2, "p": m}, informative


def heldout_prompts(prompt_ids: Tensor, seed: int, fraction: float) -> Tensor:
    """Whether each pair's prompt is held out: a fixed draw per (seed, prompt), whatever step it comes in."""
    draws = {int(p): np.random.default_rng([seed, int(p), HELDOUT_STREAM]).random() < fraction
             for p in torch.unique(prompt_ids).tolist()}
    return torch.tensor([draws[int(p)] for p in prompt_ids.tolist()], dtype=torch.bool)


def gain_ci(by_prompt: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the gain per pair, resampling held-out prompts (rows: pairs, loss, baseline)."""
    rows = by_prompt[by_prompt[:, 0] > 0]
    if len(rows) == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(rows), size=(BOOTSTRAP_SAMPLES, len(rows)))
    totals = rows[draws].sum(1)
    lo, hi = np.percentile((totals[:, 2] - totals[:, 1]) / totals[:, 0], [2.5, 97.5])
    return float(lo), float(hi)


class OnlineHead(nn.Module):
    """a(u) from the policy's hidden state at completion position u; f(u) = F_MAX * sigmoid(a(u))."""

    def __init__(self, hidden_size: int, head_hidden: int = 0) -> None:
        super().__init__()
        self.head = (nn.Linear(hidden_size, 1) if head_hidden <= 0 else
                     nn.Sequential(nn.Linear(hidden_size, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1)))

    def f(self, states: Tensor) -> Tensor:
        return F_MAX * torch.sigmoid(self.head(states.float()).squeeze(-1))

    def start_at(self, value: float) -> None:
        """The constant ``value`` everywhere: training adds what depends on the state."""
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        p = min(max(value / F_MAX, 0.02), 0.98)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(float(np.log(p / (1 - p))))

    def curve(self, states: Tensor, lengths: Tensor) -> Tensor:
        """(B, T + 1) f(0..T) from the states (B, T + 1, H) of right-padded completions of ``lengths`` tokens:
        f(0) = 0, f(len) = 1 and f(len) repeated past the end, the head's f in between."""
        f = torch.cat([torch.zeros_like(states[:, :1, 0], dtype=torch.float32), self.f(states[:, 1:])], dim=1)
        steps = torch.arange(f.size(1), device=f.device)
        end = lengths.to(f.device).unsqueeze(1)
        return torch.where((steps >= end) & (end > 0), torch.ones_like(f), f)


def warm_start_head(export: str | Path, hidden_size: int, fingerprint: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
    """A stage-2 export's head weights and hidden width, checked against the policy's tokenizer and width."""
    from pipeline.importance.export import CONFIG_FILE, WEIGHTS_FILE

    path = Path(export)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"'{path}' is not an importance-net export (no {CONFIG_FILE}): pass <run>/export")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("tokenizer") != fingerprint:
        raise UserError(f"importance net '{path}' was trained with another tokenizer than the policy: "
                        "train it on a dump of this model, or drop --importance_net to start from a constant")
    weights = {name.removeprefix("head."): tensor for name, tensor in load_file(path / WEIGHTS_FILE).items()
               if name.startswith("head.")}
    width = weights["weight" if "weight" in weights else "0.weight"].shape[1]
    if width != hidden_size:
        raise UserError(f"importance net '{path}' reads {width}-wide hidden states, the policy has {hidden_size}: "
                        "warm-start only from an export of this model")
    if info.get("net", {}).get("backbone_mode", "frozen") != "frozen":
        log.warning("warning: importance net '%s' trained its backbone; its head starts the online head on "
                    "the policy's own states all the same (uniform weights until it beats the constant)", path)
    return weights, int(info.get("net", {}).get("head_hidden", 0))


class OnlineImportance:
    """The head, its optimizer, the pair buffer and the fallback switch; everything ``state_dict`` holds."""

    def __init__(self, hidden_size: int, options: OnlineOptions, device: torch.device | str,
                 warm_start: tuple[dict[str, Tensor], int] | None = None) -> None:
        self.options, self.hidden_size = options, hidden_size
        head_hidden = warm_start[1] if warm_start is not None else options.head_hidden
        self.head = OnlineHead(hidden_size, head_hidden).to(device)
        if warm_start is not None:
            self.head.head.load_state_dict(warm_start[0])
        else:
            self.head.start_at(0.5)  # a placeholder constant: the first refit restarts it at the best one
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self.buffer = PairBuffer(options.buffer_size)
        self.started = warm_start is not None  # False: the first refit starts the head at the best constant
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
                     pairing: Pairing) -> Callable[[Tensor, slice], Tensor]:
        """``accumulate``'s ``weights_from_states``: a micro-batch's weights, from its own forward's states.

        Also keeps each pair's state at its split for the buffer, and the head's own weights for the
        log (what it would do while the fallback is on).
        """
        self._captured, self._head_weights, self._lengths = {}, [], lengths.cpu()

        def hook(states: Tensor, rows: slice) -> Tensor:
            part_mask = mask[rows]
            with torch.no_grad():
                f = self.head.curve(states, lengths[rows])
            head_weights = soft_mask_weights(softmask, part_mask, strength, f=f)
            self._head_weights.append(head_weights)
            for row in range(rows.start + rows.start % 2, rows.stop, 2):  # sister A rows of this micro-batch
                t = int(pairing.split[row])
                if t > 0 and not pairing.degenerate[row]:
                    self._captured[row] = states[row - rows.start, t:t + 1].clone()
            return soft_mask_weights("none", part_mask) if self.fallback else head_weights

        return hook

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
        states = [self._captured.get(int(r), torch.empty(0, self.hidden_size, device=mask.device)) for r in rows]
        if gather is not None:
            meta, states = _gathered(meta, states, self.hidden_size, mask.device, gather)
        self.buffer.add(meta, states)
        concentration = weight_stats(torch.cat(self._head_weights), mask)["top20_mass"] if self._head_weights \
            else float("nan")
        if step % self.options.refit_every == 0:
            self.refit()
        judged = self.judge()
        self.fallback = not gain_is_positive(judged if np.isfinite(judged["gain"]) else None)
        return {"online/buffer_pairs": float(len(self.buffer)), "online/top20_mass": concentration,
                "online/fallback": float(self.fallback), **{f"online/{k}": v for k, v in judged.items()
                                                            if k != "gain_ci95"},
                "online/gain_lo": judged["gain_ci95"][0], "online/gain_hi": judged["gain_ci95"][1]}

    def _split(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        targets, informative = pooled_targets(self.buffer.meta)
        held = heldout_prompts(self.buffer.meta["prompt_id"], self.options.seed, self.options.heldout_fraction)
        return targets, informative & ~held, informative & held

    def _pair_states(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The stored states of buffer pairs ``index`` (one row per pair with t > 0) and which pairs have one."""
        device = next(self.head.parameters()).device
        has = torch.tensor([len(self.buffer.states[i]) > 0 for i in index.tolist()], device=device)
        states = [self.buffer.states[i] for i in index.tolist() if len(self.buffer.states[i])]
        return (torch.cat(states).to(device) if states else torch.empty(0, self.hidden_size, device=device)), has

    def _pair_f(self, states: Tensor, has: Tensor) -> Tensor:
        """f(t) of pairs: the head's at their states, 0 at t = 0 (pinned)."""
        f = torch.zeros(len(has), dtype=torch.float32, device=has.device)
        return f.masked_scatter(has, self.head.f(states)).double()

    def _baseline(self, targets: dict[str, Tensor], train: Tensor) -> float:
        """The best constant f for t > 0 on the training pairs (f(0) = 0 is pinned for every model)."""
        moved = train & (self.buffer.meta["split"] > 0)
        return best_constant_f(targets["z1"][moved].numpy(), targets["z2"][moved].numpy())

    def refit(self) -> None:
        """``refit_iters`` full-batch AdamW steps of the pair likelihood on the training pairs (deterministic)."""
        targets, train, _ = self._split()
        if not bool((train & (self.buffer.meta["split"] > 0)).any()):
            return
        if not self.started:
            self.head.start_at(self._baseline(targets, train))
            self.started = True
        index = train.nonzero().squeeze(1)
        states, has = self._pair_states(index)
        z1, z2 = (targets[k][index].to(has.device) for k in ("z1", "z2"))
        for _ in range(self.options.refit_iters):
            self.optimizer.zero_grad(set_to_none=True)
            pair_nll(self._pair_f(states, has), z1, z2).mean().backward()
            self.optimizer.step()

    @torch.no_grad()
    def judge(self) -> dict[str, Any]:
        """The head's and the best constant's pair loss on held-out pairs; the gain with its bootstrap CI."""
        targets, train, held = self._split()
        nan = float("nan")
        if not bool(held.any()) or not bool((train & (self.buffer.meta["split"] > 0)).any()):
            return {"loss": nan, "baseline_loss": nan, "gain": nan, "gain_ci95": [nan, nan],
                    "heldout_pairs": float(held.sum()), "train_pairs": float(train.sum())}
        baseline_f = self._baseline(targets, train)
        index = held.nonzero().squeeze(1)
        z1, z2 = targets["z1"][index], targets["z2"][index]
        loss = pair_nll(self._pair_f(*self._pair_states(index)).cpu(), z1, z2)
        moved = self.buffer.meta["split"][index] > 0
        baseline = pair_nll(torch.where(moved, baseline_f, 0.0).double(), z1, z2)
        _, owner = torch.unique(self.buffer.meta["prompt_id"][index], return_inverse=True)
        by_prompt = torch.zeros(int(owner.max()) + 1, 3, dtype=torch.float64).index_add_(
            0, owner, torch.stack([torch.ones_like(loss), loss, baseline], dim=1)).numpy()
        gain = float((baseline - loss).mean())
        return {"loss": float(loss.mean()), "baseline_loss": float(baseline.mean()), "gain": gain,
                "gain_ci95": list(gain_ci(by_prompt)), "heldout_pairs": float(len(index)),
                "train_pairs": float(train.sum())}

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
    """Every rank's pairs, in rank order: each rank's buffer then holds the same pairs, so every rank's head is the same."""
    present = torch.tensor([len(s) > 0 for s in states], device=device)
    padded = torch.stack([s[0] if len(s) else torch.zeros(width, device=device) for s in states])
    meta = {name: gather(value.to(device)).cpu() for name, value in meta.items()}
    present, padded = gather(present), gather(padded)
    return meta, [padded[i:i + 1] if present[i] else padded[i:i] for i in range(len(padded))]


def from_args(args: GRPOArgs, hidden_size: int, tokenizer: Any, device: torch.device) -> OnlineImportance:
    """Stage 3's online importance: warm-started from ``--importance_net``'s head when given."""
    from pipeline.dump import tokenizer_fingerprint

    options = OnlineOptions(args.online_refit_every, args.online_buffer_size, args.online_refit_iters, args.online_lr,
                            heldout_fraction=args.online_heldout_fraction, seed=args.seed)
    warm = (warm_start_head(args.importance_net, hidden_size, tokenizer_fingerprint(tokenizer))
            if args.importance_net else None)
    return OnlineImportance(hidden_size, options, device, warm)
