"""Runs inside the sandbox (Debian's python3 -I -S -B -c): confine itself, load the candidate, call it
on each input, and stream one JSON line per test on the original stdout.

Before the candidate's code is even read, it leaves the keyring session it inherited (a fresh,
empty one: nothing of the trainer's, nothing of an earlier run), raises its OOM score to the
maximum (inherited by every process it starts and not lowerable without a capability, so where the
machine runs out of memory the kernel kills a run's processes before the trainer) and installs the
seccomp filter the parent built (seccomp.py); any step that fails means the candidate never runs.

Only data leaves: each returned value must be plain JSON data of exact built-in types (so an object
whose ``__eq__`` always answers True is an error), and the parent compares it with the expected
output, which never enters the sandbox. The candidate's own prints go to stderr. Standard library
only, and no syntax newer than Python 3.8, so any system python3 can run it.
"""

import ctypes
import importlib.util
import json
import os
import sys

MAX_DEPTH = 50
KEYCTL_JOIN_SESSION_KEYRING = 1
OOM_SCORE_ADJ_MAX = 1000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
FILTER_SIZE = 8  # bytes per struct sock_filter


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def confine(keyctl, program):
    """A fresh session keyring, the highest OOM score, then the filter (irrevocable, inherited by every
    thread and process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    word = ctypes.c_ulong
    if keyctl is not None and libc.syscall(ctypes.c_long(keyctl), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
                                           ctypes.c_void_p(None)) < 0:
        raise OSError(ctypes.get_errno(), "keyctl join session keyring")
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(OOM_SCORE_ADJ_MAX))
    except OSError as err:
        raise OSError(err.errno, "oom_score_adj") from err
    if program is None:
        return
    code = bytes.fromhex(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = SockFprog(len(code) // FILTER_SIZE, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, word(1), word(0), word(0), word(0)) != 0 or \
            libc.prctl(PR_SET_SECCOMP, word(SECCOMP_MODE_FILTER), ctypes.byref(fprog), word(0), word(0)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")


def plain(value, depth=0):
    """A copy made only of None/bool/int/float/str/list/dict-with-str-keys, else TypeError."""
    kind = type(value)
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    if value is None or kind in (bool, int, float, str):
        return value
    if kind in (list, tuple):
        return [plain(item, depth + 1) for item in value]
    if kind is dict and all(type(key) is str for key in value):
        return {key: plain(item, depth + 1) for key, item in value.items()}
    raise TypeError("unsupported return type")


def emit(stream, record):
    try:
        text = json.dumps(record, allow_nan=False)
    except BaseException:  # an unserialisable value (huge int, nan) is a wrong answer
        text = json.dumps({"i": record.get("i"), "error": "unserialisable"})
    stream.write(text + "\n")
    stream.flush()


def error_name(err):
    try:
        return str(type(err).__name__)[:80]
    except BaseException:
        return "?"


def main():
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = json.load(sys.stdin)
    try:
        confine(job["keyctl"], job["filter"])
    except OSError as err:
        emit(results, {"load_error": f"sandbox: {err.strerror} failed (errno {err.errno})"})
        return
    os.chdir("/work")
    with open("solution.py", "w", encoding="utf-8") as handle:
        handle.write(job["code"])
    try:
        spec = importlib.util.spec_from_file_location("solution", "/work/solution.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["solution"] = module  # pickle (multiprocessing) finds its functions by module name
        sys.path.append("/work")  # and a spawned child imports it from there
        spec.loader.exec_module(module)
        function = getattr(module, job["entry_point"])
    except BaseException as err:
        emit(results, {"load_error": error_name(err)})
        return
    for i, args in enumerate(job["inputs"]):
        try:
            record = {"i": i, "value": plain(function(*args))}
        except BaseException as err:
            record = {"i": i, "error": error_name(err)}
        emit(results, record)


main()
