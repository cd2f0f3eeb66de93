"""Sampler names -> classes, and `build`, which checks names and parameters against the classes'
own signatures (the one place parameters and defaults are declared)."""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.samplers.base import Sampler
from pipeline.samplers.complexity import RewardCurriculumSampler, TimeCurriculumSampler
from pipeline.samplers.e2h import BalancedSampler, CosineSampler, GaussianSampler, StepSampler
from pipeline.samplers.learnability import LearnabilitySampler
from pipeline.samplers.sources import MultiSourceSampler
from pipeline.samplers.variance import VarianceRegularizedSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        BalancedSampler,
        StepSampler,
        CosineSampler,
        GaussianSampler,
        VarianceRegularizedSampler,
        MultiSourceSampler,
        TimeCurriculumSampler,
        RewardCurriculumSampler,
        LearnabilitySampler,
    )
}
ALIASES = {
    "classical": "step",
    "MultiSourceSampler": "multi_source",
    "TimeCurriculumSampler": "time_curriculum",
    "CurriculumMultiSourceSampler": "time_curriculum",
    "RewardCurriculumSampler": "reward_curriculum",
    "RewardGatedCurriculumSampler": "reward_curriculum",
}
REQUIRED = inspect.Parameter.empty
_COMMON = {"rows", "batch_size", "total_steps", "seed"}


def sampler_class(name: str) -> type[Sampler]:
    cls = SAMPLERS.get(ALIASES.get(name, name))
    if cls is None:
        raise ValueError(
            f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} (old names: {', '.join(ALIASES)})"
        )
    return cls


def _signature(name: str) -> dict[str, tuple[Any, Any]]:
    """Parameter -> (default or REQUIRED, type hint), collected along the class hierarchy."""
    params: dict[str, tuple[Any, Any]] = {}
    for klass in sampler_class(name).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        signature = inspect.signature(init).parameters.values()
        for p in signature:
            if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON:
                params.setdefault(p.name, (p.default, hints.get(p.name, Any)))
        if not any(p.kind is p.VAR_KEYWORD for p in signature):
            break
    return params


def sampler_params(name: str) -> dict[str, Any]:
    """Parameter -> default (REQUIRED when it has none)."""
    return {k: default for k, (default, _) in _signature(name).items()}


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed from YAML) fits the annotation; containers are checked shallowly."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (Mapping, dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    if container in (Sequence, list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    return True


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if (typing.get_origin(hint) or hint) in (Mapping, dict, collections.abc.Mapping):
        return "a mapping"
    if (typing.get_origin(hint) or hint) in (Sequence, list, tuple, collections.abc.Sequence):
        return "a list"
    return names.get(hint, str(hint))


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter when one is unknown, missing, or of the wrong type."""
    signature = _signature(name)
    valid = {k: default for k, (default, _) in signature.items()}
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) for sampler {name!r}: {', '.join(unknown)}; valid: {_describe(valid)}"
        )
    missing = [k for k, v in valid.items() if v is REQUIRED and k not in params]
    if missing:
        raise ValueError(
            f"sampler {name!r} needs parameter(s) {', '.join(missing)}; valid: {_describe(valid)}"
        )
    for key, value in params.items():
        hint = signature[key][1]
        if not _accepts(value, hint):
            raise ValueError(f"parameter {key}={value!r} of sampler {name!r} must be {_type_name(hint)}")


def _describe(params: dict[str, Any]) -> str:
    if not params:
        return "(none)"
    return ", ".join(f"{k} (required)" if v is REQUIRED else f"{k}={v!r}" for k, v in params.items())


def build(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    total_steps: int,
    seed: int = 0,
    **params: Any,
) -> Sampler:
    """A fresh, independent sampler `name` over `rows` (see docs/samplers.md for each one)."""
    check_params(name, params)
    cls = sampler_class(name)
    return cls(rows, batch_size=batch_size, total_steps=total_steps, seed=seed, **params)
