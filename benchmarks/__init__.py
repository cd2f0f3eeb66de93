"""Benchmarks of the three stages on the embedded model (``make bench`` / ``python -m benchmarks``).

Timings live here and in docs/benchmarks.md, never in tests.
"""
