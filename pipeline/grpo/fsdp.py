"""``--strategy fsdp``: Fabric's FSDPStrategy with one FSDP unit per decoder layer.

Without an auto-wrap policy the whole model is one unit, so every forward gathers all of it at
once and FSDP saves nothing. The layer class comes from the model itself: transformers lists the
blocks that must stay whole in ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import load_config


def decoder_layer_classes(model_name: str) -> set[type[nn.Module]]:
    """The module classes of ``model_name`` named in its ``_no_split_modules`` (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(load_config(model_name))
    names = set(getattr(skeleton, "_no_split_modules", None) or ())
    classes = {type(m) for m in skeleton.modules() if type(m).__name__ in names}
    if not classes:
        raise UserError(f"--strategy fsdp: {type(skeleton).__name__} names no decoder layer class "
                        "(_no_split_modules) to shard by; use --strategy ddp")
    return classes


def make_strategy(strategy: str, model_name: str) -> Any:
    """Fabric's ``strategy`` argument: ``fsdp`` becomes an FSDPStrategy wrapping each decoder layer."""
    if strategy != "fsdp":
        return strategy
    from lightning.fabric.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=decoder_layer_classes(model_name))
