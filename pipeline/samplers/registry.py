"""Sampler names -> classes, and `build`, which checks names and parameters against the classes'
own signatures (the one place parameters and defaults are declared)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
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


def sampler_params(name: str) -> dict[str, Any]:
    """Parameter -> default (REQUIRED when it has none), collected along the class hierarchy."""
    params: dict[str, Any] = {}
    for klass in sampler_class(name).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init).parameters.values()
        for p in signature:
            if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON:
                params.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in signature):
            break
    return params


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
    cls, valid = sampler_class(name), sampler_params(name)
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
    return cls(rows, batch_size=batch_size, total_steps=total_steps, seed=seed, **params)
