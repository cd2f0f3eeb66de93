"""An HTML page that colours each completion token by f(t+1) - f(t): which tokens decided the reward."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pipeline.artifacts import atomic_write
from pipeline.importance.export import ImportanceScorer

STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}
.c{white-space:pre-wrap;font-family:monospace;border:1px solid #ddd;padding:.6em;margin-bottom:1.5em}
.p{color:#999}.t{border-radius:2px}h3{margin-bottom:.2em;font-size:1em}"""


@dataclass
class Example:
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    reward: float


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """The text each token adds (decoding growing prefixes keeps spacing right); the raw token string
    where that text is not printable alone (a byte of a multi-byte character)."""
    pieces, previous = [], ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        piece = text[len(previous):] if text.startswith(previous) else "\ufffd"
        pieces.append(tokenizer.convert_ids_to_tokens(int(ids[i - 1])) if "\ufffd" in piece else piece)
        previous = text
    return pieces


def _colour(delta: float, scale: float) -> str:
    alpha = min(abs(delta) / scale, 1.0)
    rgb = "220,50,47" if delta > 0 else "38,139,210"
    return f"rgba({rgb},{alpha:.3f})"


def write_report(scorer: ImportanceScorer, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                 path: Path, title: str = "Importance network: which tokens decided the reward") -> Path:
    """Red: the token raised f (decided part of the reward variance); blue: it lowered f. Hover for values."""
    scores = scorer.score([e.prompt_token_ids for e in examples], [e.completion_token_ids for e in examples])
    deltas = [(s[1:] - s[:-1]).tolist() for s in scores]
    scale = max([abs(d) for ds in deltas for d in ds] + [1e-6])
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>",
             f"<h2>{html.escape(title)}</h2><p>Colour: f(t+1) - f(t), full colour = {scale:.3f}. "
             f"Red tokens raised f, blue ones lowered it. Reward key: {html.escape(scorer.reward_key)}.</p>"]
    for n, (example, f, ds) in enumerate(zip(examples, scores, deltas, strict=True)):
        prompt = tokenizer.decode(example.prompt_token_ids)
        tokens = "".join(
            f"<span class='t' style='background:{_colour(d, scale)}' "
            f"title='f {f[t]:.3f} &rarr; {f[t + 1]:.3f} ({d:+.3f})'>{html.escape(piece)}</span>"
            for t, (piece, d) in enumerate(zip(token_pieces(tokenizer, example.completion_token_ids), ds, strict=True)))
        parts.append(f"<h3>#{n} reward {example.reward:.3f}, f(0) = {f[0]:.3f}, f(end) = {f[-1]:.3f}</h3>"
                     f"<div class='c'><span class='p'>{html.escape(prompt[-300:])}</span>{tokens}</div>")
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(parts), encoding="utf-8"))
    return path
