"""The trained policy and its KL reference, built to fit one GPU: LoRA, activation checkpointing, precision.

- LoRA (``--use_peft``, through peft): only the adapter trains, so the optimizer and the checkpoints
  hold only the adapter; the KL reference is the same model with its adapters disabled (no second
  copy, as TRL does); under a bf16 precision the frozen base is stored in bf16 (TRL loads it so) and
  the adapter in fp32. ``policy/`` gets the merged model plus the adapter in ``policy/adapter/``.
- ``--gradient_checkpointing``: Hugging Face's (``activation_checkpointing_enable``), non-reentrant.
  The policy is in train mode (HF only checkpoints then; Llama/Qwen have no dropout, LoRA's applies).
- Precision: a true-half precision would train the weights themselves in bf16, where AdamW's
  updates at lr 1e-6 round away: refused unless only an adapter trains. Rotary ``inv_freq``
  buffers stay fp32 whatever Fabric converts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.generation.weights import drain, hf_module, is_sharded, named_weights, plain_copy
from pipeline.models import load_causal_lm

if TYPE_CHECKING:
    from pipeline.grpo.config import GRPOArgs

ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def base_dtype(args: GRPOArgs) -> torch.dtype:
    """The frozen base of a LoRA policy is stored in bf16 under bf16 precisions; a trained policy in fp32."""
    return torch.bfloat16 if args.use_peft and args.precision.startswith("bf16") else torch.float32


def lora_config(args: GRPOArgs) -> Any:
    from peft import LoraConfig

    targets = args.lora_target_modules
    if targets and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=targets or None)


def build_policy(args: GRPOArgs) -> nn.Module:
    """The model that trains (an HF model, or a peft model around one), in train mode."""
    return prepare_policy(load_causal_lm(args.model_name, dtype=base_dtype(args)), args)


def prepare_policy(model: nn.Module, args: GRPOArgs) -> nn.Module:
    """Activation checkpointing and LoRA on a loaded HF model (in ``base_dtype(args)``), then train mode."""
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.use_peft:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, lora_config(args))
        except ValueError as err:  # e.g. target modules that the model does not have
            raise UserError(f"--use_peft: {err}".splitlines()[0]) from err
    return model.train()


def build_reference(args: GRPOArgs) -> nn.Module | None:
    """A frozen copy of the initial policy for the KL term; None without KL or with LoRA (adapters off instead)."""
    if not args.beta or args.use_peft:
        return None
    return load_causal_lm(args.model_name).eval().requires_grad_(False)


@contextmanager
def reference_model(model: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The module whose log-probs are the KL's reference: the separate copy, or the policy with adapters off."""
    if reference is not None:
        yield reference
        return
    with hf_module(model).disable_adapter():
        yield model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(policy: nn.Module, args: GRPOArgs) -> torch.optim.Optimizer:
    """AdamW over what trains, fused: the default (foreach) step holds temporaries of about twice the
    trained weights' size, more than a micro-batch's activations at 1.5B parameters."""
    return torch.optim.AdamW(trainable_parameters(policy), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def setup(fabric: Any, policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """``fabric.setup``, with rotary ``inv_freq`` buffers put back in fp32 after Fabric's dtype conversion.

    Positions times bf16 frequencies lose the rotary phase of distant tokens; the buffers are not
    parameters, so restoring them after DDP's wrapping is safe.
    """
    saved = {(module, name): buffer.detach().float().clone() for module in policy.modules()
             for name, buffer in module.named_buffers(recurse=False) if name in ROTARY_BUFFERS}
    model, optimizer = fabric.setup(policy, optimizer)
    for (module, name), value in saved.items():
        setattr(module, name, value.to(getattr(module, name).device))
    return model, optimizer


class AdapterWeights:
    """What a LoRA run checkpoints of its policy: the trainable tensors (the frozen base is on disk already)."""

    def __init__(self, model: nn.Module):
        self.model = hf_module(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(state) != expected:
            raise UserError("the checkpoint's adapter does not match this run's LoRA options (--lora_r, "
                            "--lora_target_modules): resume with the options it was trained with")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


def checkpoint_entry(model: nn.Module, use_peft: bool) -> Any:
    """The policy's entry in a checkpoint: the whole (Fabric) module, or only its adapter."""
    return AdapterWeights(model) if use_peft else model


def save_policy(model: nn.Module, tokenizer: Any, folder: Path, is_writer: bool = True) -> None:
    """An HF model directory every stage can load; a LoRA policy also leaves its adapter in ``adapter/``.

    Under FSDP every rank takes part in gathering the weights and only the writer keeps them (a
    LoRA policy under FSDP writes the merged model, without ``adapter/``).
    """
    from peft import PeftModel

    if not is_writer:
        if is_sharded(model):
            drain(model)
        return
    policy = hf_module(model)
    if is_sharded(model):
        plain_copy(model, "cpu").save_pretrained(folder)
    elif isinstance(policy, PeftModel):
        policy.save_pretrained(folder / "adapter")
        merged = {name: tensor.clone() for name, tensor in named_weights(policy)}
        policy.get_base_model().save_pretrained(folder, state_dict=merged)
    else:
        policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
