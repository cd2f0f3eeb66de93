"""A trained policy's full weights, whatever wraps it (Fabric, DDP, FSDP, PEFT).

Under FSDP a rank holds only flat shards of the parameters outside a forward pass, so anything that
needs the real tensors (the vLLM engine, the HF backend's generation copy, ``policy/`` on disk) reads
them through ``named_weights``: gathered one FSDP unit at a time, as TRL 1.16 does. Gathering is a
collective: every rank must iterate, even those that throw the tensors away.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import torch
from torch import nn

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "modules_to_save.default.")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip Fabric's and DDP's wrappers (an FSDP root stays: its shards need it)."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_forward_module", model)  # lightning.fabric's _FabricModule
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True when some parameters are FSDP shards (FSDP1 units or FSDP2 DTensors), not full tensors."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    model = unwrap(model)
    return any(isinstance(m, FSDP) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters())


def hf_module(model: nn.Module) -> nn.Module:
    """The transformers (or PEFT) model inside every wrapper: its ``config`` and class."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = unwrap(model)
    return model.module if isinstance(model, FSDP) else model


def checkpoint_name(name: str) -> str:
    """Strip the wrappers' prefixes (FSDP1, activation checkpointing, torch.compile, PEFT)."""
    for wrapper in WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _fsdp1_units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """FSDP1 units in pre-order, each gathered alone (``recurse=False``): one unit's memory at a time.

    The root goes first: gathering it initialises FSDP's state, which a nested unit must not do.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(module, FSDP):
        nested = {id(p) for sub in module.modules() if sub is not module and isinstance(sub, FSDP)
                  for p in sub.parameters()}  # still shards here: they come with their own unit
        with FSDP.summon_full_params(module, recurse=False, writeback=False):
            for name, param in module.named_parameters():
                if id(param) not in nested:
                    yield prefix + name, param
    for name, child in module.named_children():
        yield from _fsdp1_units(child, f"{prefix}{name}.")


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors under the checkpoint names of the plain HF model, one at a time.

    Unwraps Fabric/DDP, gathers FSDP shards (FSDP1 unit by unit; FSDP2: DTensor.full_tensor), and
    adds LoRA adapters' deltas to their base weights out of place: merging in place and unmerging
    after would leave the frozen base (and the KL reference, the base with adapters disabled) off by
    a rounding error that grows with every sync. A tensor is valid until the next one is drawn:
    copy it, don't keep it.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    model = unwrap(model)
    inner = hf_module(model)
    fsdp1 = any(isinstance(m, FSDP) for m in model.modules())
    peft_prefix = inner.prefix if isinstance(inner, PeftModel) else None  # "lora_" for LoRA
    lora = {f"{name}.base_layer.weight": layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    with ExitStack() as stack:
        if fsdp1 and lora:  # a LoRA delta needs its whole base weight and adapter: gather the model at once
            stack.enter_context(FSDP.summon_full_params(model, writeback=False))
        params = _fsdp1_units(model) if fsdp1 and not lora else model.named_parameters()
        for name, param in params:
            if peft_prefix is not None and (peft_prefix in name or "original_module" in name):
                continue  # adapter weights are merged; a modules_to_save copy replaces its original
            tensor = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
            if name in lora:
                tensor = merged_weight(lora[name], tensor)
            yield checkpoint_name(name), tensor


def merged_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus the deltas of the LoRA ``layer``'s active adapters, a new tensor (fp32 sum, weight's dtype)."""
    if layer.merged or layer.disable_adapters:
        return weight
    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged = merged + layer.get_delta_weight(adapter).float()
    return merged.to(weight.dtype)


def copy_weights(target: nn.Module, model: nn.Module) -> None:
    """Load ``model``'s full weights into the plain HF model ``target`` (same architecture)."""
    params = dict(target.named_parameters())
    copied = set()
    for name, tensor in named_weights(model):
        params[name].data.copy_(tensor)
        copied.add(name)
    if copied != set(params):
        raise RuntimeError(f"weights of {len(set(params) ^ copied)} parameters did not match: "
                           f"{sorted(set(params) ^ copied)[:4]}")


def plain_copy(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A plain (unwrapped, unsharded, adapter-free) HF model holding ``model``'s current weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inner = hf_module(model)
    base = inner.get_base_model() if isinstance(inner, PeftModel) else inner
    dtype = next(base.parameters()).dtype
    copy = AutoModelForCausalLM.from_config(base.config, dtype=dtype).to(device or "cpu")
    copy.generation_config = base.generation_config
    copy_weights(copy, model)
    return copy.eval().requires_grad_(False)


def drain(model: nn.Module) -> None:
    """Take part in a gather without keeping anything (the ranks that do not write)."""
    for _ in named_weights(model):
        pass
