"""Score code against hidden tests: the sandbox reports values, the parent alone compares them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.sandbox.execute import Run, execute
from pipeline.sandbox.isolation import IsolationReport
from pipeline.sandbox.probe import probe

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TestResult:
    """``status``: completed | timeout | output_limit | load_error | exited_early."""

    passed: int
    total: int
    status: str
    detail: str = ""

    @property
    def share(self) -> float:
        return self.passed / self.total if self.total else 0.0


def same(got: Any, want: Any) -> bool:
    """Equality on parsed JSON with exact types (True is not 1); floats to 1e-9 relative."""
    if type(want) is float:
        return type(got) in (int, float) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if type(got) is not type(want):
        return False
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return got == want


def run_tests(code: str, entry_point: str, tests: Sequence[dict[str, Any]], timeout_s: float = DEFAULT_TIMEOUT_S,
              report: IsolationReport | None = None) -> TestResult:
    """Run ``entry_point`` from ``code`` on each test's ``args`` in the sandbox; count ``expected`` matches.

    Raises SandboxUnavailable (before running anything) where no isolation works.
    """
    report = report or probe()
    run = execute(report.mode, report.limits, code, entry_point, [t["args"] for t in tests], timeout_s, report.cgroups)
    passed = sum(r is not None and "value" in r and same(r["value"], t["expected"])
                 for r, t in zip(run.records, tests, strict=True))
    return TestResult(passed, len(tests), _status(run), run.load_error or run.stderr_tail[-200:])


def run_batch(jobs: Sequence[tuple[str, str, Sequence[dict[str, Any]]]], timeout_s: float = DEFAULT_TIMEOUT_S,
              workers: int | None = None) -> list[TestResult]:
    """``run_tests`` over (code, entry_point, tests) jobs, ``workers`` at a time, each under its own uid."""
    report = probe()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_tests(*job, timeout_s=timeout_s, report=report), jobs))


def _status(run: Run) -> str:
    if run.timed_out:
        return "timeout"
    if run.output_capped:
        return "output_limit"
    if run.load_error is not None:
        return "load_error"
    return "exited_early" if any(r is None for r in run.records) else "completed"
