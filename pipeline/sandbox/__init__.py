"""Run untrusted code against hidden tests, confined (see docs/sandbox.md).

``probe()`` says what isolation this machine gives (or raises SandboxUnavailable: code tasks are
refused, never run unconfined); ``run_tests``/``run_batch`` score code in fresh confined processes.
"""

from pipeline.sandbox.grading import DEFAULT_TIMEOUT_S, TestResult, run_batch, run_tests, same
from pipeline.sandbox.isolation import IsolationReport, Limits, SandboxUnavailable
from pipeline.sandbox.probe import probe

__all__ = ["DEFAULT_TIMEOUT_S", "IsolationReport", "Limits", "SandboxUnavailable", "TestResult", "probe",
           "run_batch", "run_tests", "same"]
