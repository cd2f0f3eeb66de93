"""The start-up probe's payload: run through the harness like a candidate, it reports what it can do."""

import os
import resource
import socket

ATTEMPTS_BEYOND_LIMIT = 8


def _forks() -> int:
    """How many children we can fork, trying a few more than RLIMIT_NPROC (capped, so safe unconfined)."""
    limit = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 4096)
    read_end, write_end = os.pipe()
    children = []
    for _ in range(limit + ATTEMPTS_BEYOND_LIMIT):
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


def check(memory_probe_bytes: int) -> dict:
    with open("/proc/self/status") as status:
        caps = [line.split()[1] for line in status if line.startswith("Cap")]
    return {
        "uid": os.getuid(),
        "capabilities": any(int(mask, 16) for mask in caps),
        "environment": sorted(os.environ),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "visible_pids": sum(entry.isdigit() for entry in os.listdir("/proc")),
        "root_dir_visible": os.path.exists("/root"),
        "etc_visible": os.path.exists("/etc"),
        "writable_outside_work": [p for p in ("/usr/probe", "/probe", "/dev/probe") if _writable(p)],
        "work_writable": _writable("/work/probe"),
        "allocates_beyond_limit": _allocates(memory_probe_bytes),
        "forks": _forks(),
    }
