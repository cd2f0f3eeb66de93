"""The start-up probe's payload: run through the harness like a candidate, it reports what it can do."""

from __future__ import annotations  # the system python3 may be older than 3.10

import ctypes
import os
import resource
import socket
import threading
import time

ATTEMPTS_BEYOND_LIMIT = 8
IPC_PRIVATE, IPC_RMID = 0, 0
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
PR_SET_NAME = 15
SLEEPER_S = 3600  # far past any run: only the sandbox's end can stop it


def _attempts() -> int:
    return min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 4096) + ATTEMPTS_BEYOND_LIMIT


def _forks() -> int:
    """How many children we can fork, trying a few more than RLIMIT_NPROC (capped, so safe unconfined)."""
    read_end, write_end = os.pipe()
    children = []
    for _ in range(_attempts()):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    return len(children)


def _threads() -> int:
    """How many threads we can start, as many tries: RLIMIT_NPROC counts threads too."""
    release = threading.Event()
    started = []
    for _ in range(_attempts()):
        thread = threading.Thread(target=release.wait)
        try:
            thread.start()
        except RuntimeError:
            break
        started.append(thread)
    release.set()
    for thread in started:
        thread.join()
    return len(started)


def _detached_sleeper(name: str) -> bool:
    """Leave a grandchild behind in a session of its own, named ``name`` for the parent to look for
    once the run is over; True once it runs, False where no process can be started."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return False
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
                os.write(write_end, b".")
                time.sleep(SLEEPER_S)
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    running = os.read(read_end, 1) == b"."
    os.close(read_end)
    return running


def _clone_new_user(libc: ctypes.CDLL, number: int | None) -> int:
    """clone(CLONE_NEWUSER) as a raw call (a child that gets one exits at once): the pid, or -1."""
    if number is None:
        return -1
    pid = libc.syscall(ctypes.c_long(number), ctypes.c_long(CLONE_NEWUSER | SIGCHLD), *[ctypes.c_long(0)] * 4)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
    return pid


def _memory_outside_address_space(clone_number: int | None) -> list:
    """Each way to hold memory that RLIMIT_AS does not count which works here (each tried small)."""
    libc = ctypes.CDLL(None, use_errno=True)
    worked = []
    for name, make, remove in (
            ("shmget", lambda: libc.shmget(IPC_PRIVATE, 4096, 0o600), lambda i: libc.shmctl(i, IPC_RMID, None)),
            ("msgget", lambda: libc.msgget(IPC_PRIVATE, 0o600), lambda i: libc.msgctl(i, IPC_RMID, None)),
            ("semget", lambda: libc.semget(IPC_PRIVATE, 1, 0o600), lambda i: libc.semctl(i, 0, IPC_RMID)),
            ("inotify", lambda: libc.inotify_init1(0), os.close),
            ("clone user namespace", lambda: _clone_new_user(libc, clone_number), lambda i: None),
            ("unshare user namespace", lambda: libc.unshare(CLONE_NEWUSER), lambda i: None)):
        handle = make()
        if handle >= 0:
            worked.append(name)
            remove(handle)
    try:
        os.close(os.memfd_create("probe"))
        worked.append("memfd_create")
    except OSError:
        pass
    return worked


def _writable(path: str) -> bool:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return True
    except OSError:
        return False


def _allocates(size: int) -> bool:
    try:
        bytearray(size)
        return True
    except MemoryError:
        return False


def check(memory_probe_bytes: int, sleeper_name: str, clone_number: int | None) -> dict:
    with open("/proc/self/status") as status:
        caps = [line.split()[1] for line in status if line.startswith("Cap")]
    return {
        "uid": os.getuid(),
        "oom_score_adj": int(open("/proc/self/oom_score_adj").read()),
        "capabilities": any(int(mask, 16) for mask in caps),
        "environment": sorted(os.environ),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "visible_pids": sum(entry.isdigit() for entry in os.listdir("/proc")),
        "root_dir_visible": os.path.exists("/root"),
        "etc_visible": os.path.exists("/etc"),
        "writable_outside_work": [p for p in ("/usr/probe", "/probe", "/dev/probe") if _writable(p)],
        "work_writable": _writable("/work/probe"),
        "allocates_beyond_limit": _allocates(memory_probe_bytes),
        "mounts": [line.split()[4] for line in open("/proc/1/mountinfo")],
        "forks": _forks(),
        "threads": _threads(),
        "detached_sleeper": _detached_sleeper(sleeper_name),
        "memory_outside_address_space": _memory_outside_address_space(clone_number),  # last: may enter a user namespace
    }
