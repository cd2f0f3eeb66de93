"""The seccomp filter every candidate runs under: no memory outside its processes' address spaces.

RLIMIT_AS bounds what one process maps, but not memory that belongs to no process: System V shared
memory, message queues and semaphores, memfd files, POSIX message queues, a tmpfs mounted in a new
user namespace, kernel memory that grows with calls rather than file descriptors (inotify and
fanotify watches pin inodes, io_uring rings, bpf maps). The filter refuses every call that makes one
(EPERM), so a run holds at most its processes' address spaces (RLIMIT_NPROC of them, each under
RLIMIT_AS) plus its size-capped tmpfs (and what their file descriptors can pin).

Processes are allowed (``fork``, ``vfork``, ``clone``), so an honest solution may use ``subprocess``
or ``multiprocessing``; their number and lifetime are bounded outside the filter (RLIMIT_NPROC, the
PID namespace: see isolation.py). ``clone`` is refused with any ``CLONE_NEW*`` flag (a new user
namespace could mount an uncapped tmpfs), and ``clone3`` answers ENOSYS, whose flags a filter cannot
read, so the C library falls back to ``clone``. The same filter on every machine, so a candidate's
score never depends on where it ran.

Also refused: the keyring calls, so nothing a run stores in its uid's keyrings survives it; and
``ptrace``, so no process of a run can rewrite another's calls after the filter checked them (which
kernels before 4.8 allowed).

Classic BPF, built here with no library; the harness installs it (``prctl``) before the candidate's
code is read. Architectures not listed get no filter (``program()`` is None).
"""

from __future__ import annotations

import errno
import platform
import struct

REFUSED = ("shmget", "semget", "msgget", "mq_open", "memfd_create", "memfd_secret", "inotify_init",
           "inotify_init1", "fanotify_init", "io_uring_setup", "bpf", "unshare", "setns", "add_key",
           "request_key", "keyctl", "ptrace")
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (NEWTIME is clone3/unshare only)
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
X32_SYSCALL_BIT = 0x40000000

# arch -> (AUDIT_ARCH_*, syscall numbers); from the kernel's unistd headers
ARCHES = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "shmget": 29, "semget": 64, "msgget": 68, "mq_open": 240,
        "memfd_create": 319, "memfd_secret": 447, "inotify_init": 253, "inotify_init1": 294,
        "fanotify_init": 300, "io_uring_setup": 425, "bpf": 321, "unshare": 272, "setns": 308,
        "add_key": 248, "request_key": 249, "keyctl": 250, "ptrace": 101}),
    "aarch64": (0xC00000B7, {  # no inotify_init: the C library uses inotify_init1
        "clone": 220, "clone3": 435, "shmget": 194, "semget": 190, "msgget": 186, "mq_open": 180,
        "memfd_create": 279, "memfd_secret": 447, "inotify_init1": 26, "fanotify_init": 262,
        "io_uring_setup": 425, "bpf": 280, "unshare": 97, "setns": 268, "add_key": 217,
        "request_key": 218, "keyctl": 219, "ptrace": 117}),
}

# classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}
LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET = 0x06  # BPF_RET | BPF_K
NR, ARCH, ARG0_LOW = 0, 4, 16  # offsets into seccomp_data (args are little-endian u64 on both arches)
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
ERRNO = 0x00050000


def machine() -> str:
    return platform.machine()


def program() -> bytes | None:
    """The filter for this machine's architecture as ``struct sock_filter[]`` bytes, or None."""
    if machine() not in ARCHES:
        return None
    audit_arch, numbers = ARCHES[machine()]
    code = [(LD_ABS, 0, 0, ARCH), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL_PROCESS), (LD_ABS, 0, 0, NR)]
    if machine() == "x86_64":  # the x32 ABI shares the arch value: its calls would bypass the numbers
        code += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, KILL_PROCESS)]
    for name in REFUSED:
        if name in numbers:
            code += [(JEQ, 0, 1, numbers[name]), (RET, 0, 0, ERRNO | errno.EPERM)]
    code += [(JEQ, 0, 1, numbers["clone3"]), (RET, 0, 0, ERRNO | errno.ENOSYS),
             (JEQ, 0, 3, numbers["clone"]), (LD_ABS, 0, 0, ARG0_LOW), (JSET, 0, 1, CLONE_NAMESPACES),
             (RET, 0, 0, ERRNO | errno.EPERM),
             (RET, 0, 0, ALLOW)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in code)


def keyctl_number() -> int | None:
    """The keyctl syscall, for the harness to join a fresh session keyring before the filter goes on."""
    return ARCHES[machine()][1]["keyctl"] if machine() in ARCHES else None
