"""Run one job in a fresh confined process: feed it the job on stdin, read its results with caps,
SIGKILL it at the wall-clock deadline, and make sure nothing it started survives (the PID namespace
ends every descendant with the run; as root, a sweep of the run's uid then checks and counts)."""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from pipeline.sandbox import seccomp
from pipeline.sandbox.cgroup import RunCgroups
from pipeline.sandbox.isolation import TOOL_PATH, Limits, command
from pipeline.sandbox.procs import kill_children, sweep
from pipeline.sandbox.slots import POOL

log = logging.getLogger(__name__)
CHUNK = 65536
FILTER = seccomp.program()


@dataclass
class Run:
    """What came back: one harness record per input index (None: it never reported)."""

    records: list[dict[str, Any] | None]
    load_error: str | None = None
    timed_out: bool = False
    output_capped: bool = False
    stderr_tail: str = ""
    survivors: int = 0  # processes of the run still alive after its sandbox ended (the sweep killed them)


def execute(mode: str, limits: Limits, code: str, entry_point: str, inputs: Sequence[Sequence[Any]],
            timeout_s: float, cgroups: RunCgroups | None = None) -> Run:
    """Call ``entry_point(*args)`` of ``code`` for each args in ``inputs`` inside the sandbox (and in a
    memory cgroup of its own where ``cgroups`` gives one)."""
    payload = json.dumps({"code": code, "entry_point": entry_point, "inputs": [list(a) for a in inputs],
                          "filter": FILTER.hex() if FILTER else None, "keyctl": seccomp.keyctl_number()}).encode()
    group = cgroups.run(limits.run_memory_bytes, limits.processes) if cgroups else nullcontext([])
    with POOL.take() as uid, group as enter:
        deadline = time.monotonic() + timeout_s
        proc = subprocess.Popen(enter + command(mode, uid, limits, timeout_s), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env={"PATH": TOOL_PATH})
        try:
            out, err, capped = _communicate(proc, payload, deadline, limits)
            timed_out = _wait(proc, deadline)
        finally:
            _stop(proc)
            survivors = sweep(uid) if os.geteuid() == 0 else 0
    if survivors:
        log.warning("sandbox uid %d: %d processes outlived their run's PID namespace", uid, survivors)
    run = _parse(out, len(inputs))
    run.timed_out, run.output_capped, run.survivors = timed_out, capped, survivors
    run.stderr_tail = err[-400:].decode(errors="replace")
    return run


def _communicate(proc: subprocess.Popen, payload: bytes, deadline: float,
                 limits: Limits) -> tuple[bytes, bytes, bool]:
    """Write stdin and read stdout/stderr until both close, a cap is hit (we close it) or the deadline."""
    caps = {proc.stdout: limits.stdout_bytes, proc.stderr: limits.stderr_bytes}
    data = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    capped = False
    pending = memoryview(payload)
    with selectors.DefaultSelector() as selector:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while len(selector.get_map()) and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        pending = pending[os.write(stream.fileno(), pending[:CHUNK]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    done = not pending
                else:
                    chunk = os.read(stream.fileno(), CHUNK)
                    data[stream] += chunk
                    over = len(data[stream]) > caps[stream]
                    capped |= over
                    done = not chunk or over
                if done:
                    selector.unregister(stream)
                    stream.close()
    return bytes(data[proc.stdout][:limits.stdout_bytes]), bytes(data[proc.stderr][:limits.stderr_bytes]), capped


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """True when the deadline passed first."""
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        return False
    except subprocess.TimeoutExpired:
        return True


def _stop(proc: subprocess.Popen) -> None:
    """Kill the namespace's init (everything inside dies with it), then the outer process."""
    if proc.poll() is None:
        kill_children(proc.pid)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def _parse(out: bytes, count: int) -> Run:
    """Harness lines -> records; anything malformed, duplicated or out of range is ignored."""
    run = Run(records=[None] * count)
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict):
            continue
        if "load_error" in record and run.load_error is None:
            run.load_error = str(record["load_error"])[:80]
        index = record.get("i")
        if type(index) is int and 0 <= index < count and run.records[index] is None:
            run.records[index] = record
    return run
