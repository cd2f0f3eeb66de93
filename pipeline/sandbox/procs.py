"""The process table from /proc: who is still running under a sandbox uid (or by a name), and whose
child is who."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    threads: int
    name: str  # the first 15 bytes of the command name (``prctl(PR_SET_NAME)`` sets it)


def processes() -> list[Proc]:
    """Every process we can read (each task counts towards RLIMIT_NPROC, hence ``threads``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            found.append(Proc(int(entry.name), int(fields["PPid"]), int(fields["Uid"].split()[0]),
                              int(fields["Threads"]), fields["Name"].strip()))
        except (OSError, KeyError, ValueError):  # the process ended while we read it
            continue
    return found


def tasks_of(uid: int) -> int:
    """Tasks (threads included) running under ``uid``, as RLIMIT_NPROC counts them."""
    return sum(p.threads for p in processes() if p.uid == uid)


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_children(parent: int) -> None:
    """SIGKILL the direct children of ``parent``: the sandbox's PID-namespace init takes the rest along."""
    kill([p.pid for p in processes() if p.ppid == parent])


def sweep(uid: int, timeout_s: float = 5.0) -> int:
    """SIGKILL everything running under a dedicated sandbox uid until nothing is left; how many
    processes it found (after a run: 0 unless something outlived the sandbox's PID namespace)."""
    deadline = time.monotonic() + timeout_s
    found: set[int] = set()
    while True:
        left = [p.pid for p in processes() if p.uid == uid]
        if not left:
            return len(found)
        found.update(left)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox uid {uid}: processes {left[:10]} survive SIGKILL")
        kill(left)
        time.sleep(0.005)
