"""The credit task's true f in every stage: beside the stage-1 dump, against stage 2's net, as stage 3's
``oracle`` importance source and in its per-step log of where the soft mask puts its weight.

The truth is ``pipeline.tasks.credit.true_f`` under the policy that sampled the completions, summed up
by its accuracy on each decision (pooled over the completions at hand: the dump's, or the step's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pipeline.artifacts import atomic_write
from pipeline.dump import read_dump
from pipeline.tasks.credit import Spec, decision_accuracy, decision_mask, policy_p, true_f

TASK = "credit"
TRUTH_FILE = "true_f.csv"  # beside the stage-1 dump's parts (not .parquet: stage 2 reads those as parts)
POSITION_BINS = 10


def is_credit(task_names: Sequence[str]) -> np.ndarray:
    return np.asarray(task_names) == TASK


def describe_accuracy(accuracy: dict[tuple, float]) -> dict[str, float]:
    """JSON-ready: 'length=16 k=2 binary noise=0.1 decision=0' -> p."""
    return {f"length={length} k={k} {kind} noise={noise} decision={j}": round(p, 4)
            for ((length, k, kind, noise), j), p in sorted(accuracy.items())}


def curves(answers: Sequence[str], lengths: Sequence[int], accuracy: dict[tuple, float]) -> list[np.ndarray]:
    """True f(0..n) of each completion of n tokens."""
    out = []
    for answer, n in zip(answers, lengths, strict=True):
        spec = Spec.from_answer(answer)
        out.append(true_f(spec, policy_p(spec, accuracy), int(n)))
    return out


def write_dump_truth(dump_dir: Path, frame: pd.DataFrame) -> dict[str, Any] | None:
    """Stage 1: the true f of each pair's shared prefix (``true_f`` at ``split_token_idx``) and of the
    whole completion, in ``true_f.csv``; None for a dump without credit rows."""
    rows = frame[is_credit(frame["task_name"])]
    if rows.empty:
        return None
    accuracy = decision_accuracy(rows["answer"].tolist(), rows["completion_text"].tolist())
    pairs = rows[rows["sister"] == 0]
    f = curves(pairs["answer"].tolist(), pairs["num_completion_tokens"].tolist(), accuracy)
    truth = pd.DataFrame({
        "prompt_id": pairs["prompt_id"].to_numpy(), "group_id": pairs["group_id"].to_numpy(),
        "pair_id": pairs["pair_id"].to_numpy(), "split_token_idx": pairs["split_token_idx"].to_numpy(),
        "true_f": [float(c[min(int(t), len(c) - 1)]) for c, t in zip(f, pairs["split_token_idx"], strict=True)],
        "true_f_end": [float(c[-1]) for c in f],
    })
    atomic_write(dump_dir / TRUTH_FILE, lambda tmp: truth.to_csv(tmp, index=False))
    return {"file": TRUTH_FILE, "pairs": len(truth), "policy": "each decision right with the dump's own accuracy",
            "decision_accuracy": describe_accuracy(accuracy)}


def compare(f_net: Sequence[np.ndarray], answers: Sequence[str], accuracy: dict[tuple, float]) -> dict[str, Any]:
    """Mean absolute error of f and of its increments against the truth, for the net and for the uniform
    f(t) = t / n (what a soft mask without credit assigns), by token kind and by relative position."""
    specs = [Spec.from_answer(a) for a in answers]
    truth = curves(answers, [len(f) - 1 for f in f_net], accuracy)
    rows = []
    for spec, net, true in zip(specs, f_net, truth, strict=True):
        n = len(net) - 1
        if n < 1:
            continue
        uniform = np.arange(n + 1) / n
        decision = decision_mask(spec, n)
        u = np.arange(1, n + 1)
        rows.append(pd.DataFrame({
            "decision": decision, "bin": np.minimum((u / n * POSITION_BINS).astype(int), POSITION_BINS - 1),
            "f_net": np.abs(net[1:] - true[1:]), "f_uniform": np.abs(uniform[1:] - true[1:]),
            "inc_net": np.abs(np.diff(net) - np.diff(true)), "inc_uniform": np.abs(np.diff(uniform) - np.diff(true)),
            "share_net": np.diff(net), "share_true": np.diff(true)}))
    table = pd.concat(rows, ignore_index=True)
    on = table["decision"]
    weight_net, weight_true = table["share_net"].clip(lower=0), table["share_true"].clip(lower=0)
    return {
        "completions": len(rows), "tokens": len(table), "decision_tokens": int(on.sum()),
        "mae_f": float(table["f_net"].mean()), "mae_f_uniform": float(table["f_uniform"].mean()),
        "mae_increment_decision": float(table.loc[on, "inc_net"].mean()),
        "mae_increment_decision_uniform": float(table.loc[on, "inc_uniform"].mean()),
        "mae_increment_other": float(table.loc[~on, "inc_net"].mean()),
        "mae_increment_other_uniform": float(table.loc[~on, "inc_uniform"].mean()),
        "decision_share_net": float(weight_net[on].sum() / max(weight_net.sum(), 1e-12)),
        "decision_share_true": float(weight_true[on].sum() / max(weight_true.sum(), 1e-12)),
        "decision_share_tokens": float(on.mean()),
        "mae_f_by_position": {f"{b / POSITION_BINS:.1f}-{(b + 1) / POSITION_BINS:.1f}": float(v)
                              for b, v in table.groupby("bin")["f_net"].mean().items()},
    }


def compare_export(scorer: Any, rollouts: str | Path, prompt_ids: Sequence[int]) -> dict[str, Any] | None:
    """Stage 2: ``compare`` on every dumped completion of the given (validation) prompts, the truth under
    the dump's own accuracy; None for a dump without credit rows."""
    frame = read_dump(rollouts, columns=["prompt_id", "task_name", "answer", "completion_text",
                                         "prompt_token_ids", "completion_token_ids"]).to_pandas()
    frame = frame[is_credit(frame["task_name"])]
    if frame.empty:
        return None
    accuracy = decision_accuracy(frame["answer"].tolist(), frame["completion_text"].tolist())
    rows = frame[frame["prompt_id"].isin(prompt_ids)]
    f = scorer.score([list(p) for p in rows["prompt_token_ids"]], [list(c) for c in rows["completion_token_ids"]])
    return compare([np.asarray(x.cpu(), dtype=float) for x in f], rows["answer"].tolist(), accuracy)


class OracleImportance:
    """Stage 3's ``--importance oracle``: the task's true f under the policy of this step (its accuracy on
    each decision, pooled over the step's completions), in the shape stage 2's scorer returns."""

    def score_padded(self, answers: Sequence[str], texts: Sequence[str], lengths: Sequence[int],
                     width: int) -> Tensor:
        accuracy = decision_accuracy(answers, texts)
        out = torch.ones(len(answers), width + 1)
        for i, f in enumerate(curves(answers, lengths, accuracy)):
            n = min(len(f), width + 1)
            out[i, :n] = torch.as_tensor(f[:n], dtype=torch.float32)
            out[i, n:] = float(f[n - 1])
        return out

    def to(self, device: torch.device | str) -> OracleImportance:
        """Nothing to move: the truth is computed on the CPU, as stage 2's scorer's output is used."""
        return self


def step_metrics(answers: Sequence[str], texts: Sequence[str], weights: Tensor, mask: Tensor,
                 online_f: Tensor | None = None) -> dict[str, float]:
    """Stage 3's per-step view of the credit: the soft mask's weight share on decision tokens beside their
    share of tokens (what uniform weights give), and the online head's f against the truth."""
    live = mask.float().cpu()
    on = torch.as_tensor(np.stack([decision_mask(Spec.from_answer(a), live.size(1)) for a in answers])).float() * live
    weights = weights.detach().float().cpu()
    metrics = {"credit/decision_weight_share": float((weights * on).sum() / (weights * live).sum().clamp_min(1e-12)),
               "credit/decision_token_share": float(on.sum() / live.sum().clamp_min(1e-12))}
    if online_f is not None:
        lengths = live.sum(1).long().tolist()
        f = [np.asarray(online_f[i, :n + 1].detach().cpu(), dtype=float) for i, n in enumerate(lengths)]
        truth = compare(f, answers, decision_accuracy(answers, texts))
        metrics |= {"credit/online_mae_f": truth["mae_f"],
                    "credit/online_mae_increment_decision": truth["mae_increment_decision"]}
    return metrics


__all__ = ["TASK", "TRUTH_FILE", "OracleImportance", "compare", "compare_export", "curves", "is_credit",
           "step_metrics", "write_dump_truth"]
