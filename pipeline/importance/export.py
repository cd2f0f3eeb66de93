"""The exported network: one directory that ``load`` turns into a scorer in any process.

Layout of ``<run>/export/``::

    importance_net.json      format, NetConfig (backbone name/path, mode, head, form, pinned end),
                             tokenizer fingerprint, reward_key, group_stats, likelihood, baseline_f,
                             validation {likelihood, gain, gain_ci95, pairs, prompts}
    trainable.safetensors    the weights training changed: head (+ last-k layers or LoRA adapters)

The backbone is referenced, not copied: ``load`` rebuilds it from ``--backbone`` and refuses to go
on if its tokenizer no longer matches the fingerprint.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.artifacts import write_json
from pipeline.dump import tokenizer_fingerprint
from pipeline.errors import UserError
from pipeline.importance.model import ImportanceNet, NetConfig
from pipeline.models import load_tokenizer

FORMAT_VERSION = 2  # 2: pinned ends, forms, position features (format 1 nets need retraining)
CONFIG_FILE = "importance_net.json"
WEIGHTS_FILE = "trainable.safetensors"

TokenIds = Sequence[int] | Tensor | np.ndarray


def save_export(net: ImportanceNet, path: Path, **info: Any) -> Path:
    """Write the export next to ``path`` and rename it into place: readers never see half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_file({k: v.contiguous().cpu() for k, v in net.trainable_state_dict().items()}, tmp / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, {"format": FORMAT_VERSION, "net": net.config.to_dict(), **info})
        umask = os.umask(0)
        os.umask(umask)
        for item in (tmp, *tmp.iterdir()):  # mkdtemp/mkstemp make them private; others load exports too
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_token_list(x: Any) -> bool:
    if isinstance(x, (Tensor, np.ndarray)):
        return x.ndim == 1
    return len(x) > 0 and isinstance(x[0], numbers.Integral)


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, (Tensor, np.ndarray)) else [int(i) for i in ids]


class ImportanceScorer:
    """f(t) for t = 0..len(completion) of any (prompt, completion), from one forward pass per batch."""

    def __init__(self, net: ImportanceNet, info: dict[str, Any]) -> None:
        self.net = net.eval()
        self.info = info
        self.tokenizer_fingerprint: dict[str, Any] = info["tokenizer"]
        self.reward_key: str = info["reward_key"]
        self.group_stats: str = info["group_stats"]
        self.backbone: str = net.config.backbone
        self.validation: dict[str, Any] | None = info.get("validation")  # stage 2's gain over the constant f

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImportanceScorer:
        self.net.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def score(self, prompt_token_ids: TokenIds | Sequence[TokenIds],
              completion_token_ids: TokenIds | Sequence[TokenIds], batch_size: int = 16) -> Tensor | list[Tensor]:
        """f at every completion position: a tensor of len(completion) + 1 values per completion.

        Takes one prompt and one completion (lists of ids or 1-D tensors) or sequences of them
        (then returns a list, in input order). f(0) = 0, f(len) = 1 (unless the net was trained
        with a learnt end), entry t in between is read at the hidden state of the last token of
        prompt + completion[:t]; f(t + 1) - f(t) is how much token t decided the reward, so the
        increments of a completion sum to 1. Completions of the same prompt are batched together
        and the prompt is forwarded once for them (``batch_size`` counts completions).
        """
        single = _is_token_list(prompt_token_ids)
        prompts = [_as_list(prompt_token_ids)] if single else [_as_list(p) for p in prompt_token_ids]
        completions = [_as_list(completion_token_ids)] if single else [_as_list(c) for c in completion_token_ids]
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token: the first completion token attends to it")
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i], len(completions[i])))  # same prompts adjacent
        out: list[Tensor] = [torch.empty(0)] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            f = self.net.curve([prompts[i] for i in rows], [completions[i] for i in rows])
            for row, i in enumerate(rows):
                out[i] = f[row, : len(completions[i]) + 1]
        return out[0] if single else out

    def score_padded(self, prompt_token_ids: Sequence[TokenIds], completion_token_ids: Sequence[TokenIds],
                     width: int | None = None, batch_size: int = 16) -> Tensor:
        """(B, width + 1) for right-padded completions of ``width`` tokens (the GRPO soft mask's layout).

        Past a completion's end f repeats its last value, so f(t + 1) - f(t) is 0 on padding and each
        row's increments sum to f(len) - f(0) = 1.
        """
        scores = self.score(prompt_token_ids, completion_token_ids, batch_size=batch_size)
        width = max(len(s) for s in scores) - 1 if width is None else width
        if any(len(s) > width + 1 for s in scores):
            raise ValueError(f"a completion is longer than width={width}")
        return torch.stack([torch.cat([s, s[-1:].expand(width + 1 - len(s))]) for s in scores])


def load(path: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> ImportanceScorer:
    """Rebuild an exported importance network (backbone + trained weights) ready to ``score``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"'{path}' is not an importance-net export (no {CONFIG_FILE}): pass <run>/export")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != FORMAT_VERSION:
        raise UserError(f"'{path}' has export format {info.get('format')}, this code reads {FORMAT_VERSION}")
    net = ImportanceNet(NetConfig(**info["net"]))
    weights = load_file(path / WEIGHTS_FILE)
    expected = set(net.trainable_state_dict())
    if set(weights) != expected:
        raise UserError(f"'{path / WEIGHTS_FILE}' does not match the network in {CONFIG_FILE} "
                        f"({len(set(weights) ^ expected)} mismatched tensors): re-export the run")
    net.load_state_dict(weights, strict=False)
    found = tokenizer_fingerprint(load_tokenizer(net.config.backbone))
    if found != info["tokenizer"]:
        raise UserError(f"backbone '{net.config.backbone}' now has tokenizer {found}, the export was built with "
                        f"{info['tokenizer']}: the backbone changed since training; retrain or restore it")
    return ImportanceScorer(net.to(device=device, dtype=dtype), info)
