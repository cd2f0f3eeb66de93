"""Call named, weighted reward functions as TRL 1.16's GRPOTrainer calls them, and total them as it does.

A function is called by keyword with ``prompts``, ``completions``, ``completion_ids``, one list per
dataset column (all but ``prompt``), ``trainer_state`` and the ``log_extra(column, values)`` and
``log_metric(name, value)`` callables. Where a row's ``prompt`` is chat messages, its prompt stays
messages and its completion is ``[{"role": "assistant", "content": text}]``; otherwise both are text.
``async def`` functions are awaited together. A function without ``**kwargs`` gets only the
arguments it names; one that requires a column the dataset lacks is refused before any work.

None (or NaN) means "no reward for this row". The total is the weighted nansum over functions, NaN
where every function gave none (such a row is left out of its group's statistics, advantage 0).
A function that raises on the batch is retried row by row: each row it fails on counts as a
failure and gets NaN; a function that fails on every row stops the run, naming it and its error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.prompting import is_conversational
from pipeline.reward_call import CONTEXT, NOT_COLUMNS

log = logging.getLogger(__name__)
RewardFn = Callable[..., list[float | None]]


def reward_registry() -> dict[str, RewardFn]:
    import rewards  # the user-editable module at the repository root

    return rewards.REWARDS


def parse_reward_weights(spec: str | Mapping[str, float] | None, default: Mapping[str, float]) -> dict[str, float]:
    """``"correct=1,format=0.1"`` (or a mapping, or None for the task default) -> validated weights."""
    if spec is None or spec == "":
        weights = dict(default)
    elif isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if value else 1.0
            except ValueError as err:
                raise UserError(f"--rewards: '{part}' is not name=weight (e.g. correct=1,format=0.1)") from err
    known = reward_registry()
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise UserError(f"--rewards: unknown reward(s) {', '.join(unknown)}; rewards.py has {', '.join(known)}")
    return weights


@dataclass
class TrainerState:
    """The part of TRL's ``trainer_state`` a reward function may read, e.g. to shape rewards over training."""

    global_step: int = 0  # optimizer steps done before these completions were sampled
    max_steps: int = 0


@dataclass
class RewardBatch:
    per_function: dict[str, np.ndarray]  # NaN where the function gave None, NaN or failed
    total: np.ndarray  # weighted nansum; NaN where every function gave none
    failures: dict[str, int] = field(default_factory=dict)  # rows on which a function raised
    metrics: dict[str, list[float]] = field(default_factory=dict)  # log_metric values
    extra: dict[str, list] = field(default_factory=dict)  # log_extra columns


def weighted_total(per_function: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """TRL's total: the weighted nansum over functions, NaN for a row where every function gave NaN."""
    values = np.stack([per_function[name] for name in weights], axis=1)
    total = np.nansum(values * np.array(list(weights.values())), axis=1)
    total[np.isnan(values).all(axis=1)] = np.nan
    return total


def reward_inputs(rows: Sequence[Mapping[str, Any]], prompts: Sequence[str], completions: Sequence[str],
                  completion_ids: Sequence[Sequence[int]]) -> dict[str, list]:
    """TRL's per-row arguments; ``prompts`` are the rendered texts, used for rows without a ``prompt``."""
    chat = [is_conversational(row.get("prompt")) for row in rows]
    return {
        "prompts": [text if row.get("prompt") is None else row["prompt"] for row, text in zip(rows, prompts, strict=True)],
        "completions": [[{"role": "assistant", "content": c}] if is_chat else c
                        for c, is_chat in zip(completions, chat, strict=True)],
        "completion_ids": [list(ids) for ids in completion_ids],
        **{key: [row.get(key) for row in rows] for key in rows[0] if key not in NOT_COLUMNS},
    }


def _parameters(fn: RewardFn) -> tuple[set[str] | None, list[str]]:
    """(the keywords ``fn`` accepts, None for any; the ones it requires)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None, []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.name in named and p.default is p.empty]
    return (None if any(p.kind is p.VAR_KEYWORD for p in params) else named), required


def check_reward_arguments(weights: Iterable[str], columns: Iterable[str],
                           fix: str = "add them or choose other --rewards") -> None:
    """Refuse, before any work, a reward function that requires a column the dataset lacks."""
    columns = [c for c in columns if c not in NOT_COLUMNS]
    available = {"prompts", "completions", "completion_ids", *CONTEXT, *columns}
    registry = reward_registry()
    for name in weights:
        missing = [arg for arg in _parameters(registry[name])[1] if arg not in available]
        if missing:
            raise UserError(f"reward '{name}' needs column(s) {', '.join(missing)}, which the dataset lacks "
                            f"(it has {', '.join(columns)}): {fix}")


async def _call(fn: RewardFn, kwargs: Mapping[str, Any]) -> np.ndarray:
    accepted, _ = _parameters(fn)
    out = fn(**{k: v for k, v in kwargs.items() if accepted is None or k in accepted})
    values = list(await out if inspect.isawaitable(out) else out)
    n = len(kwargs["completions"])
    if len(values) != n:
        raise ValueError(f"returned {len(values)} rewards for {n} completions")
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _describe(err: Exception, columns: Iterable[str]) -> str:
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if isinstance(err, KeyError) and err.args and err.args[0] not in columns:
        text += f" (the dataset has no column {err.args[0]!r})"
    return text


async def _score_function(name: str, fn: RewardFn, per_row: Mapping[str, list],
                          context: Mapping[str, Any]) -> tuple[np.ndarray, int]:
    """The function's rewards for the batch, row by row if the batch call raises; (values, rows failed)."""
    try:
        return await _call(fn, {**per_row, **context}), 0
    except Exception:  # noqa: BLE001 - user code: find the rows it fails on
        pass
    n = len(per_row["completions"])
    outcomes = await asyncio.gather(*(_call(fn, {**{k: v[i:i + 1] for k, v in per_row.items()}, **context})
                                      for i in range(n)), return_exceptions=True)
    errors = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, Exception)]
    if len(errors) == n:
        raise UserError(f"reward '{name}' failed on every completion of the batch: {_describe(errors[0][1], per_row)}")
    for i, err in errors:
        log.warning("reward '%s' failed on row %d (recorded as NaN): %s", name, i, _describe(err, per_row))
    return np.array([math.nan if isinstance(o, Exception) else o[0] for o in outcomes]), len(errors)


def score(weights: Mapping[str, float], rows: Sequence[Mapping[str, Any]], prompts: Sequence[str],
          completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
          state: TrainerState | None = None) -> RewardBatch:
    """Score a batch: ``rows`` are the dataset rows aligned with the completions (a prompt's row
    repeated for each of its completions), ``prompts`` the rendered prompt texts."""
    registry = reward_registry()
    per_row = reward_inputs(rows, prompts, completions, completion_ids)
    check_reward_arguments(weights, rows[0])
    metrics: dict[str, list[float]] = defaultdict(list)
    extra: dict[str, list] = defaultdict(list)
    context = {"trainer_state": state or TrainerState(),
               "log_extra": lambda column, values: extra[column].extend(values),
               "log_metric": lambda name, value: metrics[name].append(float(value))}

    async def score_all() -> list[tuple[np.ndarray, int]]:
        return await asyncio.gather(*(_score_function(name, registry[name], per_row, context) for name in weights))

    results = dict(zip(weights, asyncio.run(score_all()), strict=True))
    per_function = {name: values for name, (values, _) in results.items()}
    total = weighted_total(per_function, weights)
    if np.isnan(total).any():
        log.warning("%d of %d completions got no reward from any function (left out, advantage 0)",
                    int(np.isnan(total).sum()), len(total))
    return RewardBatch(per_function, total, {name: k for name, (_, k) in results.items() if k},
                       dict(metrics), dict(extra))


def summarize_batches(batches: Iterable[RewardBatch]) -> dict[str, Any]:
    """A run's reward bookkeeping for its metadata: failures per function, and the mean of each
    ``log_metric`` name and of each ``log_extra`` column's numeric values."""
    failures: Counter[str] = Counter()
    metrics: dict[str, list[float]] = defaultdict(list)
    extra: dict[str, list[float]] = defaultdict(list)
    for batch in batches:
        failures.update(batch.failures)
        for name, values in batch.metrics.items():
            metrics[name].extend(values)
        for column, values in batch.extra.items():
            extra[column].extend(float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    return {"failures": dict(failures), "metrics": _means(metrics), "extra": _means(extra)}


def _means(logged: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in logged.items() if values}
