"""Hybrid reward: the verifier's 0/1 verdict v refined by a reward model's score s.

    v = 1:  (1 - beta) + 2 beta  (s - min) / (max - min + eps)    in [1 - beta, 1 + beta)
    v = 0:  -alpha     + 2 alpha (s - min) / (max - min + eps)    in [-alpha, alpha)

Within the calibrated range a right answer outscores a wrong one (for alpha + beta <= 1), and the
reward model orders answers inside each class, so a group whose answers are all right or all wrong
still has reward variance to learn from. min and max come from a warm-up pass before the run and
are saved to a JSON file, so a rerun or resume scores on the same scale. With several ranks each
scores a share of the warm-up completions, all take min/max of the gathered scores, rank 0 writes.

The stage calls ``configure_hybrid`` (and ``calibrate`` when the state file has no calibration
yet); the ``hybrid`` entry of rewards.py then reads the configured instance via ``active_hybrid``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.artifacts import now_iso, read_json, write_json
from pipeline.errors import UserError
from pipeline.generation.base import GenerationBackend, Request, SamplingParams
from pipeline.models import load_tokenizer, resolve_model


def combine(verified: Sequence[float], scores: Sequence[float], low: float, high: float,
            alpha: float = 0.5, beta: float = 0.5, eps: float = 0.01) -> np.ndarray:
    """The hybrid formula, elementwise (verified is 1 for a right answer, else 0)."""
    v, s = np.asarray(verified, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    scaled = (s - low) / (high - low + eps)
    return np.where(v >= 0.5, (1 - beta) + 2 * beta * scaled, -alpha + 2 * alpha * scaled)


class HybridReward:
    """A loaded reward model, its calibration and the formula's weights: the run's one hybrid reward."""

    def __init__(self, reward_model: str, state_path: Path, alpha: float, beta: float, eps: float,
                 batch_size: int, max_length: int, device: torch.device | str = "cpu"):
        path = resolve_model(reward_model)
        device = torch.device(device)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        except (OSError, ValueError) as err:
            raise UserError(f"--reward_model '{reward_model}' could not be loaded as a sequence classifier "
                            f"({type(err).__name__}): pass a local HF directory or a cached hub id") from err
        if self.model.config.num_labels != 1:
            raise UserError(f"--reward_model '{reward_model}' has {self.model.config.num_labels} labels: "
                            "pass a reward model with one scalar output (num_labels=1)")
        self.tokenizer = load_tokenizer(reward_model)
        self.tokenizer.truncation_side = "left"  # the score is read at the last token: keep the end
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.reward_model, self.state_path = reward_model, Path(state_path)
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.batch_size, self.max_length = batch_size, max_length
        self.calibration: dict[str, Any] | None = self._load_calibration()

    def _load_calibration(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        state = read_json(self.state_path, "delete it to calibrate again")
        if state["reward_model"] != self.reward_model:
            raise UserError(f"'{self.state_path}' holds a calibration of reward model '{state['reward_model']}', "
                            f"not '{self.reward_model}': use another output directory or delete the file")
        return state

    def _text(self, prompt: str, completion: str, question: str | None) -> str:
        """With the row's question, the RM's own chat template; else the policy prompt + completion."""
        if question is not None and self.tokenizer.chat_template:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], completions: Sequence[str],
               questions: Sequence[str] | None = None) -> np.ndarray:
        """The reward model's score of every (prompt, completion), in batches."""
        texts = [self._text(p, c, None if questions is None else questions[i])
                 for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length, add_special_tokens=False)
            logits = self.model(**batch.to(self.model.device)).logits
            out.append(logits[:, 0].float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def calibrate(self, prompts: Sequence[str], completions: Sequence[str], questions: Sequence[str] | None = None,
                  gather: Callable[[Any], list[Any]] | None = None, write: bool = True) -> dict[str, Any]:
        """Set min/max from warm-up completions and save them to the state file.

        ``gather``: every rank's scores from this rank's (collective: all ranks call); ``write``: this
        rank saves the file (one rank only).
        """
        values = self.scores(prompts, completions, questions)
        if gather is not None:
            values = np.concatenate([np.asarray(v, dtype=np.float64) for v in gather(values)])
        if not len(values):
            raise UserError("hybrid reward calibration needs at least one completion: raise --rm_calibration_prompts")
        self.calibration = {"reward_model": self.reward_model, "min": float(values.min()),
                            "max": float(values.max()), "num_samples": len(values), "created": now_iso()}
        if write:
            write_json(self.state_path, self.calibration)
        return self.calibration

    def __call__(self, verified: Sequence[float], prompts: Sequence[str], completions: Sequence[str],
                 questions: Sequence[str] | None = None) -> list[float]:
        if self.calibration is None:
            raise RuntimeError("the hybrid reward was configured but never calibrated: call calibrate() first")
        values = combine(verified, self.scores(prompts, completions, questions), self.calibration["min"],
                         self.calibration["max"], self.alpha, self.beta, self.eps)
        return values.tolist()

    def metadata(self) -> dict[str, Any]:
        """What a run's metadata records about its hybrid reward."""
        return {"reward_model": self.reward_model, "alpha": self.alpha, "beta": self.beta, "eps": self.eps,
                "state_path": str(self.state_path), "calibration": self.calibration}


_active: HybridReward | None = None


def configure_hybrid(reward_model: str, state_path: str | Path, alpha: float = 0.5, beta: float = 0.5,
                     eps: float = 0.01, batch_size: int = 16, max_length: int = 2048,
                     device: torch.device | str = "cpu") -> HybridReward:
    """Load the reward model onto ``device`` with any saved calibration; make it the one ``hybrid`` uses."""
    global _active
    if alpha < 0 or beta < 0 or eps <= 0 or batch_size < 1:
        raise UserError(f"hybrid reward needs alpha, beta >= 0, eps > 0, batch size >= 1 "
                        f"(got {alpha}, {beta}, {eps}, {batch_size})")
    _active = HybridReward(reward_model, Path(state_path), alpha, beta, eps, batch_size, max_length, device)
    return _active


def active_hybrid() -> HybridReward:
    if _active is None:
        raise RuntimeError("reward 'hybrid' needs a reward model: pass --reward_model")
    return _active


def check_hybrid_args(weights: Mapping[str, float], reward_model: str | None) -> None:
    """``--reward_model`` goes with the ``hybrid`` reward, both ways (checked before anything loads)."""
    if "hybrid" in weights and not reward_model:
        raise UserError("--rewards hybrid needs --reward_model PATH_OR_ID (a one-output sequence classifier)")
    if reward_model and "hybrid" not in weights:
        raise UserError(f"--reward_model is only used by the hybrid reward: add hybrid=1 to --rewards "
                        f"(now {','.join(f'{k}={v:g}' for k, v in weights.items())}) or drop --reward_model")
    if reward_model:
        try:
            resolve_model(reward_model)
        except UserError as err:
            raise UserError(f"--reward_model: {err}") from err


def prepare_hybrid(weights: Mapping[str, float], reward_model: str | None, state_path: Path,
                   backend: Callable[[], GenerationBackend], tokenizer,
                   prompts: Sequence[tuple[str, list[int]]], questions: Sequence[str], num_prompts: int,
                   params: SamplingParams, seed: int, *, device: torch.device | str = "cpu", rank: int = 0,
                   world_size: int = 1, gather: Callable[[Any], list[Any]] | None = None) -> dict[str, Any] | None:
    """What a stage does before scoring: load the RM and calibrate once, on one sample per prompt.

    The generation engine is built first: vLLM sizes its share of the GPU from what is free, so a
    reward model loaded before it would leave it too little. A rerun or resume finds the calibration
    in ``state_path`` and skips the warm-up pass. With several ranks (``gather`` collects every
    rank's list), rank r generates and scores warm-up prompts r, r + world_size, ...
    """
    check_hybrid_args(weights, reward_model)
    if "hybrid" not in weights:
        return None
    engine = backend()
    hybrid = configure_hybrid(reward_model, state_path, device=device)
    if hybrid.calibration is None:
        mine = list(range(min(num_prompts, len(prompts))))[rank::world_size]
        requests = [Request(prompts[i][1], params.max_new_tokens, seed + i) for i in mine]
        completions = engine.generate(requests, params) if requests else []
        texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        hybrid.calibrate([prompts[i][0] for i in mine], texts, [questions[i] for i in mine], gather=gather,
                         write=rank == 0)
    return hybrid.metadata()
