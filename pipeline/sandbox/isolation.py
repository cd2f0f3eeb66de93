"""How a candidate process is confined: limits, and the command line of each isolation mode.

Both modes run the candidate as a non-root uid (RLIMIT_NPROC is ignored for root), with no
capabilities, an empty environment, no network, its own PID namespace, read-only ``/usr`` as the
only host directory, and size-capped tmpfs for ``/work``, ``/tmp`` and ``/dev/shm``.

A candidate may start processes (``subprocess``, ``multiprocessing``), contained by count and by
lifetime: RLIMIT_NPROC caps the uid's tasks (threads included; a dedicated uid per run as root, and
``pids.max`` where the run has a cgroup), and the PID namespace bounds their lifetime: when its init
ends (the candidate returns, crashes or is killed at the deadline) the kernel kills every process
left in it, double-forked or ``setsid`` ones included; as root a sweep of the run's uid follows.

- ``bubblewrap``: prlimit -> setpriv (to a dedicated uid; skipped when we are not root) -> bwrap,
  the harness as the namespace's PID 1 (``--as-pid-1``, so bwrap reaps it and no zombie waits
  for the host's init).
- ``unshare`` (root only, where unprivileged user namespaces are off): prlimit -> unshare -> a root
  shell as PID 1 builds the same root with mounts and pivots into it -> setpriv -> python3.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.sandbox.cgroup import RunCgroups
from pipeline.sandbox.procs import tasks_of
from pipeline.sandbox.slots import UID_BASE

SYSTEM_PYTHON = "/usr/bin/python3"  # outside /root, readable by every uid (a pyenv python is not)
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MODES = ("bubblewrap", "unshare")
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # symlinks into /usr on merged-/usr systems
MOUNT_POINTS = ("/", "/usr", "/proc", "/dev", "/tmp", "/work", *(f"/{name}" for name in ROOT_LINKS))  # + /dev/*
HARNESS = Path(__file__).with_name("harness.py").read_text()


class SandboxUnavailable(UserError):
    """No isolation works on this machine, so code tasks are refused rather than run unconfined."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits; the parent's wall-clock timeout is the one that ends a run."""

    address_space_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 24  # RLIMIT_NPROC (and pids.max): every task of the run, threads and launchers included
    tmpfs_bytes: int = 16 << 20  # each of /work, /tmp, /dev/shm
    kernel_bytes: int = 64 << 20  # pipes, sockets, page tables, the launchers: only a memory cgroup counts them
    stdout_bytes: int = 1 << 20  # the results channel
    stderr_bytes: int = 64 << 10  # the candidate's own output

    @property
    def run_memory_bytes(self) -> int:
        """A run's memory cgroup limit, all its processes together: one address space, its three tmpfs,
        the kernel's share (forked children mostly share their parent's pages)."""
        return self.address_space_bytes + 3 * self.tmpfs_bytes + self.kernel_bytes

    @property
    def memory_without_cgroup_bytes(self) -> int:
        """All one run may hold where no memory cgroup counts it: the filter leaves no memory outside
        its processes, so ``processes`` full address spaces, its three tmpfs, the kernel's share."""
        return self.processes * self.address_space_bytes + 3 * self.tmpfs_bytes + self.kernel_bytes


@dataclass(frozen=True)
class IsolationReport:
    """What the start-up probe found: the mode in use and what a candidate could do inside it."""

    mode: str
    as_root: bool
    limits: Limits
    checks: dict[str, Any] = field(default_factory=dict)
    cgroups: RunCgroups | None = None  # where each run gets a memory cgroup of its own

    def summary(self) -> str:
        who = f"dedicated uids from {UID_BASE} via setpriv" if self.as_root else f"own uid {os.getuid()} (not root)"
        namespaces = "user/pid/net/ipc/uts/mount/cgroup" if self.mode == "bubblewrap" else "pid/net/ipc/uts/mount/cgroup"
        nproc = f"{self.limits.processes}" + ("" if self.as_root else " above what the uid already runs")
        pids = f", pids.max {self.limits.processes}" if self.cgroups and self.cgroups.pids else ""
        seccomp = "seccomp (no SysV IPC, memfd, namespaces, keyrings, ptrace)"
        if self.cgroups:
            memory = (f"{self.limits.run_memory_bytes >> 20} MiB by a memory cgroup per run under {self.cgroups.base}"
                      + (f" and {seccomp}" if self.checks.get("seccomp") else ""))
        else:
            memory = (f"{self.limits.memory_without_cgroup_bytes >> 20} MiB ({self.limits.processes} address "
                      f"spaces) by {seccomp} (no memory cgroup: {self.checks.get('cgroup')})")
        return (f"sandbox: {self.mode}, {who}; {namespaces} namespaces, no capabilities, empty environment, "
                f"network {self.checks.get('interfaces')}, forks stopped at {self.checks.get('forks')} and "
                f"threads at {self.checks.get('threads')} (RLIMIT_NPROC {nproc}{pids}), every descendant "
                f"killed at the end of a run, memory per run at most {memory}, address space "
                f"{self.limits.address_space_bytes >> 20} MiB, tmpfs /work /tmp /dev/shm "
                f"{self.limits.tmpfs_bytes >> 20} MiB each, /usr read-only, no /root or /etc, only the sandbox's mounts")


def tool(name: str) -> str | None:
    return shutil.which(name, path=TOOL_PATH)


def missing_tools(mode: str) -> list[str]:
    needed = ["prlimit", "setpriv",
              *(["bwrap"] if mode == "bubblewrap" else ["unshare", "mount", "umount", "pivot_root"])]
    missing = [t for t in needed if tool(t) is None]
    return missing + ([] if os.path.exists(SYSTEM_PYTHON) else [SYSTEM_PYTHON])


def modes_for_this_user() -> tuple[str, ...]:
    """unshare needs root for its mounts; bubblewrap works unprivileged where user namespaces are on."""
    return MODES if os.geteuid() == 0 else ("bubblewrap",)


def command(mode: str, uid: int, limits: Limits, timeout_s: float) -> list[str]:
    """argv that runs the harness confined as ``uid``; its stdin carries the job."""
    cpu_s = int(timeout_s) + 1
    as_root = os.geteuid() == 0
    # not root: the candidate shares our uid, so its budget sits on top of what already runs under it
    nproc = limits.processes if as_root else tasks_of(uid) + limits.processes
    rlimits = [tool("prlimit"), f"--cpu={cpu_s}:{cpu_s + 1}", f"--as={limits.address_space_bytes}",
               f"--fsize={limits.file_size_bytes}", f"--nofile={limits.open_files}", f"--nproc={nproc}",
               "--core=0", "--"]
    drop = [tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"] if as_root else []
    python = [SYSTEM_PYTHON, "-I", "-S", "-B", "-c", HARNESS]
    if mode == "bubblewrap":
        return rlimits + drop + _bwrap(limits) + python
    return rlimits + [tool("unshare"), "--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts",
                      "--cgroup", "--propagation", "private", "--", "/bin/sh", "-c", UNSHARE_ROOT, "sh",
                      str(limits.tmpfs_bytes), " ".join(ROOT_LINKS), *drop, "/usr/bin/env", "-i", *python]


def _root_links() -> list[tuple[str, str | None]]:
    """(name, symlink target or None for a real directory) for /bin, /lib, ... as this host has them."""
    out = []
    for name in ROOT_LINKS:
        path = Path("/", name)
        if path.is_symlink():
            out.append((name, os.readlink(path)))
        elif path.is_dir():
            out.append((name, None))
    return out


def _bwrap(limits: Limits) -> list[str]:
    args = [tool("bwrap"), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--as-pid-1", "--clearenv", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for name, target in _root_links():
        args += ["--symlink", target, f"/{name}"] if target else ["--ro-bind", f"/{name}", f"/{name}"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for path in ("/tmp", "/dev/shm", "/work"):
        args += ["--size", str(limits.tmpfs_bytes), "--tmpfs", path]
    return args + ["--chdir", "/work", "--remount-ro", "/dev", "--remount-ro", "/"]


# PID 1 of the new namespaces (root, in a private mount namespace): build bwrap's layout under
# /tmp/root, pivot into it and drop the host's mounts (the mount table then holds only the sandbox's,
# as /proc/1/mountinfo shows), then run "$@" (setpriv ... python3) as a child, so PID 1 stays root
# and keeps unshare's parent-death signal (a credential change would clear it).
UNSHARE_ROOT = r"""
set -eu
size=$1; links=$2; shift 2
mount -t tmpfs -o size=1m,mode=0700 sandbox /tmp
r=/tmp/root; mkdir $r
mount -t tmpfs -o size=1m,mode=0755 sandbox $r
mkdir $r/usr $r/proc $r/dev $r/tmp $r/work $r/.host
ro_bind() { mkdir -p "$2"; mount --bind "$1" "$2"; mount -o remount,bind,ro,nosuid,nodev "$2"; }
ro_bind /usr $r/usr
for n in $links; do
  if [ -L /$n ]; then ln -s "$(readlink /$n)" $r/$n; elif [ -d /$n ]; then ro_bind /$n $r/$n; fi
done
mount -t proc -o nosuid,nodev,noexec proc $r/proc
for d in null zero full random urandom; do touch $r/dev/$d; mount --bind /dev/$d $r/dev/$d; done
mkdir $r/dev/shm
for d in tmp dev/shm work; do mount -t tmpfs -o size=$size,mode=1777,nosuid,nodev sandbox $r/$d; done
cd $r
pivot_root . .host
umount -l /.host
rmdir /.host
mount -o remount,ro /
"$@"  # not the last command, so the shell forks it rather than exec'ing it
exit $?
"""
