"""Dedicated sandbox uids, one per concurrent run: RLIMIT_NPROC counts a uid's tasks system-wide, so
two runs sharing a uid would share (and could exhaust) one budget, and a sweep would hit both.

A uid is claimed with an exclusive lock file, so separate trainer processes on one machine never
use the same uid; the lock dies with the process that holds it. Not root: our own uid is the only one.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.sandbox.procs import sweep

UID_BASE = 61000
UID_COUNT = 64
LOCK_DIR = Path("/run/rvgrpo-sandbox")


class UidPool:
    def __init__(self) -> None:
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._held: dict[int, int] = {}  # uid -> lock file descriptor
        self._lock = threading.Lock()

    @property
    def claimed(self) -> list[int]:
        """The uids this process holds (each runs nothing between our runs)."""
        return sorted(self._held)

    @contextmanager
    def take(self) -> Iterator[int]:
        """A uid nobody else is running under, for the duration of one run."""
        if os.geteuid() != 0:
            yield os.getuid()
            return
        uid = self._get()
        try:
            yield uid
        finally:
            self._free.put(uid)

    def _get(self) -> int:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            uid = self._claim()
        return self._free.get() if uid is None else uid

    def _claim(self) -> int | None:
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        for uid in range(UID_BASE, UID_BASE + UID_COUNT):
            if uid in self._held or _has_account(uid):
                continue
            fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            sweep(uid)  # leftovers of a process that held this uid and died
            self._held[uid] = fd
            return uid
        return None


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


POOL = UidPool()
