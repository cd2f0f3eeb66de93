"""Tiny timing helpers shared by the benchmarks: a stopwatch, medians, ratios, target checks, the table.

Compared variants are always measured side by side in one process, interleaved, so that load from
other processes hits them alike; the order alternates from one round to the next (A B, B A, ...)
so that a drift in load does not favour whichever runs first.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@contextmanager
def accumulate(totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to ``totals[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def timed_method(obj: Any, name: str, totals: dict[str, float], key: str | None = None) -> None:
    """Wrap the *instance* attribute ``obj.name`` so each call's wall time adds to ``totals[key]``.

    Instrumentation only: the pipeline's code is not changed, only this object's bound method.
    """
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with accumulate(totals, key or name):
            return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def rounds(variants: Sequence[str], n: int) -> Iterator[tuple[int, list[str]]]:
    """``n`` rounds of every variant, the order reversed on odd rounds (A B, B A, A B, ...)."""
    for r in range(n):
        yield r, list(variants) if r % 2 == 0 else list(reversed(variants))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@dataclass
class Check:
    """One issue target: ``value`` must be <= (or >=) ``target``."""

    name: str
    value: float
    target: float
    op: str  # "<=" or ">="
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN
            return False
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"result": "PASS" if self.passed else "MISS"}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def table(rows: Sequence[tuple[str, Any]], title: str) -> str:
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [title, "-" * len(title)]
    lines += [f"  {k:<{width}}  {fmt(v)}" for k, v in rows]
    return "\n".join(lines)


def checks_table(checks: Sequence[Check]) -> str:
    lines = ["Targets", "-------"]
    width = max((len(c.name) for c in checks), default=10)
    for c in checks:
        verdict = "PASS" if c.passed else "MISS"
        lines.append(f"  {c.name:<{width}}  {fmt(c.value):>8} {c.op} {fmt(c.target):<6} {verdict}"
                     + (f"   ({c.detail})" if c.detail else ""))
    return "\n".join(lines)


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall times of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        with Stopwatch() as sw:
            fn()
        times.append(sw.seconds)
    return times
