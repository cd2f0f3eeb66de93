"""A memory cgroup per run, where cgroup v2 delegates the memory controller to us.

``memory.max`` counts everything a run holds, whoever holds it: every process, shared memory, tmpfs
pages, kernel memory; past it the kernel kills the run (``memory.oom.group``), never the trainer.
Where the pids controller is delegated too, ``pids.max`` caps the run's tasks (threads included)
however many the uid runs elsewhere, a second wall behind RLIMIT_NPROC. ``cgroup.kill`` ends
whatever is left of the run after it.

cgroup v2 gives controllers to a cgroup's children only while it runs no process itself, so the
first use moves the processes of our cgroup (the trainer and what it started) into a leaf child
``rvgrpo-trainer``; each run then gets a sibling ``rvgrpo-run-<pid>-<n>``, removed after it. Any step
that fails (no cgroup v2, controller not delegated, no write access) makes the machine one without
a memory cgroup, with the reason in one line.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
LEAF = "rvgrpo-trainer"
PROOF_LIMIT_BYTES = 32 << 20
PROOF_ALLOCATION_BYTES = 128 << 20
PROOF_TIMEOUT_S = 30.0
PROOF_TASKS = 64  # room for the allocating python: the proof is of memory.max
REMOVE_TIMEOUT_S = 5.0
_numbers = itertools.count()


class CgroupUnavailable(Exception):
    """Why this machine gives no memory cgroup per run (one line)."""


@dataclass(frozen=True)
class RunCgroups:
    """A cgroup whose children may get the memory controller (and ``pids``): one child per run."""

    base: Path
    pids: bool = False  # the children get the pids controller too

    @contextmanager
    def run(self, memory_bytes: int, tasks: int) -> Iterator[list[str]]:
        """A fresh cgroup with ``memory.max`` (and ``pids.max``); yields the argv prefix that starts a
        command inside it."""
        path = self.base / f"rvgrpo-run-{os.getpid()}-{next(_numbers)}"
        path.mkdir()
        try:
            (path / "memory.max").write_text(str(memory_bytes))
            if self.pids:
                (path / "pids.max").write_text(str(tasks))
            for name in ("memory.swap.max", "memory.zswap.max"):
                if (path / name).exists():
                    (path / name).write_text("0")
            (path / "memory.oom.group").write_text("1")
            yield ["/bin/sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(path / "cgroup.procs")]
        finally:
            _remove(path)

    def prove(self) -> None:
        """A command allocating more than its cgroup's ``memory.max`` is killed, and the cgroup says so."""
        with self.run(PROOF_LIMIT_BYTES, PROOF_TASKS) as enter:
            group = Path(enter[-1]).parent
            allocate = f"data = b'x' * {PROOF_ALLOCATION_BYTES}"
            try:
                done = subprocess.run([*enter, sys.executable, "-I", "-S", "-c", allocate], timeout=PROOF_TIMEOUT_S,
                                      capture_output=True)
            except subprocess.TimeoutExpired as err:
                raise CgroupUnavailable("the memory cgroup proof timed out") from err
            kills = _events(group).get("oom_kill", 0)
        if done.returncode == 0 or kills == 0:
            raise CgroupUnavailable(f"{PROOF_ALLOCATION_BYTES >> 20} MiB allocated under memory.max "
                                    f"{PROOF_LIMIT_BYTES >> 20} MiB (exit {done.returncode}, oom_kill {kills})")


def delegated() -> RunCgroups:
    """Our cgroup, set up to hand the memory controller (and pids, where offered) to per-run
    children, or CgroupUnavailable."""
    mount = _cgroup2_mount()
    own = mount / _own_path().lstrip("/")
    base = own.parent if own.name == LEAF else own
    try:
        offered = (base / "cgroup.controllers").read_text().split()
        if "memory" not in offered:
            raise CgroupUnavailable(f"memory controller not delegated to {base}")
        wanted = [name for name in ("memory", "pids") if name in offered]
        if set(wanted) - set((base / "cgroup.subtree_control").read_text().split()):
            _enable(base, " ".join(f"+{name}" for name in wanted))
    except OSError as err:
        raise CgroupUnavailable(f"{base}: {err.strerror}") from err
    return RunCgroups(base, pids="pids" in wanted)


def _enable(base: Path, controllers: str) -> None:
    try:
        (base / "cgroup.subtree_control").write_text(controllers)
        return
    except OSError as err:
        if err.errno != errno.EBUSY:  # EBUSY: the cgroup runs processes itself
            raise
    leaf = base / LEAF
    leaf.mkdir(exist_ok=True)
    for pid in (base / "cgroup.procs").read_text().split():
        try:
            (leaf / "cgroup.procs").write_text(pid)
        except ProcessLookupError:
            continue
    (base / "cgroup.subtree_control").write_text(controllers)
    log.info("moved the processes of %s into %s to give runs a cgroup each (%s)", base, leaf, controllers)


def _cgroup2_mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    raise CgroupUnavailable("no cgroup v2 mounted")


def _own_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise CgroupUnavailable("this process is in no cgroup v2")


def _events(path: Path) -> dict[str, int]:
    try:
        return {key: int(value) for key, value in (line.split() for line in (path / "memory.events").read_text().splitlines())}
    except OSError:
        return {}


def _remove(path: Path) -> None:
    """Kill whatever still runs in the run's cgroup, then remove it once it is empty."""
    if (path / "cgroup.kill").exists():
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + REMOVE_TIMEOUT_S
    while True:
        try:
            path.rmdir()
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("could not remove %s: %s", path, err.strerror)
                return
        time.sleep(0.01)
