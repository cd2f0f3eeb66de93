"""The sandbox against hostile candidates, in every isolation mode this machine has.

Bombs (fork, thread, memory, disk) only run once the start-up probe has shown, in this session and
for that mode, that the process limit holds for the sandbox uid; otherwise they are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.sandbox import SandboxUnavailable, isolation, probe, run_tests
from pipeline.sandbox.procs import processes
from pipeline.sandbox.slots import POOL

TIMEOUT = 5.0  # for runs that should finish: generous, so a loaded machine does not fail them
KILL_AFTER = 1.5  # for runs that should be killed: short, so the file stays fast
SLACK = 2.0  # start-up, SIGKILL and the sweep
TESTS = [{"args": [i], "expected": 2 * i} for i in range(3)]
CORRECT = "def f(x):\n    return 2 * x\n"


@pytest.fixture(scope="module", params=isolation.MODES)
def sandbox(request):
    try:
        return probe(request.param)
    except SandboxUnavailable as err:
        pytest.skip(f"{request.param}: {err}")


@pytest.fixture
def confined(sandbox):
    """The sandbox, only where the probe saw forking stop below RLIMIT_NPROC (else a bomb is unsafe)."""
    if not sandbox.checks["forks"] < sandbox.limits.processes:
        pytest.skip(f"{sandbox.mode}: process limit not shown to hold, bombs not run")
    return sandbox


def leftovers() -> list[int]:
    """Processes under the uids this test session runs candidates as (other sessions may use others)."""
    return [p.pid for p in processes() if p.uid in POOL.claimed]


def run(report, code: str, tests=TESTS, timeout: float = TIMEOUT):
    """run_tests, checking that it ended in time and left nothing running."""
    start = time.monotonic()
    result = run_tests(code, "f", tests, timeout_s=timeout, report=report)
    assert time.monotonic() - start < timeout + SLACK
    assert leftovers() == []
    return result


def test_probe_finds_isolation_where_the_tools_exist():
    if os.geteuid() != 0 and shutil.which("bwrap") is None:
        pytest.skip("not root and no bubblewrap: refusing is the expected outcome here")
    report = probe()
    assert report.mode in isolation.MODES and report.checks["uid"] != 0
    assert report.checks["forks"] < report.limits.processes
    assert report.mode in report.summary()


def test_without_isolation_code_tasks_are_refused_in_one_line(monkeypatch):
    from pipeline.tasks.coding import CodingTask

    probe.cache_clear()
    monkeypatch.setattr(isolation, "tool", lambda name: None)
    try:
        with pytest.raises(SandboxUnavailable) as err:
            probe()
        assert "\n" not in str(err.value) and "code tasks refused" in str(err.value)
        with pytest.raises(SandboxUnavailable):
            run_tests(CORRECT, "f", TESTS)
        with pytest.raises(SandboxUnavailable):
            CodingTask(name="coding", default_rewards={})
    finally:
        probe.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="unshare fallback needs root")
def test_without_bubblewrap_root_falls_back_to_unshare(monkeypatch):
    real_tool = isolation.tool
    probe.cache_clear()
    monkeypatch.setattr(isolation, "tool", lambda name: None if name == "bwrap" else real_tool(name))
    try:
        report = probe()
        assert report.mode == "unshare" and report.checks["forks"] < report.limits.processes
        assert run_tests(CORRECT, "f", TESTS).passed == 3
    finally:
        probe.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an ordinary user")
def test_an_ordinary_user_gets_bubblewrap_under_its_own_uid():
    """Not root (an HPC node): no setpriv, bwrap as ourselves, RLIMIT_NPROC on top of what we run."""
    copy = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        package = Path(__file__).parents[1] / "pipeline"
        shutil.copytree(package / "sandbox", copy / "pipeline" / "sandbox",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(package / "errors.py", copy / "pipeline" / "errors.py")
        (copy / "pipeline" / "__init__.py").write_text("")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755)
        script = ("import json, sys; sys.path.insert(0, sys.argv[1])\n"
                  "from pipeline.sandbox import SandboxUnavailable, probe, run_tests\n"
                  "try:\n    r = probe()\nexcept SandboxUnavailable as err:\n"
                  "    print(json.dumps({'refused': str(err)})); sys.exit()\n"
                  f"res = run_tests({CORRECT!r}, 'f', {TESTS!r}, report=r)\n"
                  "print(json.dumps({'mode': r.mode, 'as_root': r.as_root, 'forks': r.checks['forks'],"
                  " 'limit': r.limits.processes, 'uid': r.checks['uid'], 'passed': res.passed}))\n")
        proc = subprocess.run([shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                               isolation.SYSTEM_PYTHON, "-B", "-c", script, str(copy)],
                              capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": isolation.TOOL_PATH})
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(copy)
    if "refused" in out:
        assert "\n" not in out["refused"] and "code tasks refused" in out["refused"]
    else:
        assert out == {"mode": "bubblewrap", "as_root": False, "forks": out["forks"], "limit": out["limit"],
                       "uid": 65534, "passed": 3}
        assert out["forks"] < out["limit"]


@pytest.mark.parametrize("code, passed, status", [
    (CORRECT, 3, "completed"),
    ("def f(x):\n    return 2 * x if x < 2 else 0\n", 2, "completed"),
    ("def f(x):\n    return 2 * x if x else True\n", 2, "completed"),  # True is not 0
    ("def f(x:\n", 0, "load_error"),
    ("def g(x):\n    return 2 * x\n", 0, "load_error"),
    ("import sys\nsys.exit(0)\n", 0, "load_error"),
    ("import os\nos._exit(0)\n", 0, "exited_early"),
    ("import sys\ndef f(x):\n    sys.exit(0)\n", 0, "completed"),
    ("def f(x):\n    return int(input())\n", 0, "completed"),
    ("class Eq:\n    def __eq__(self, other):\n        return True\n\ndef f(x):\n    return Eq()\n", 0, "completed"),
    ("class Eq(int):\n    def __eq__(self, other):\n        return True\n\ndef f(x):\n    return Eq(7)\n", 0, "completed"),
    ("import json, os\nfor fd in range(10):\n    for line in ('3/3 tests passed', json.dumps({'i': 0, 'value': 'pass'})):\n"
     "        try:\n            os.write(fd, (line + chr(10)).encode())\n        except OSError:\n            pass\n"
     "print('ALL TESTS PASSED')\nos._exit(0)\n", 0, "exited_early"),
])
def test_answers_and_cheats_score_their_honest_share(sandbox, code, passed, status):
    result = run(sandbox, code)
    assert (result.passed, result.total, result.status) == (passed, 3, status)


@pytest.mark.parametrize("code", [
    "def f(x):\n    while True:\n        pass\n",
    "import time\ndef f(x):\n    time.sleep(100)\n",
    "def f(x):\n    while True:\n        try:\n            return int(input())\n        except BaseException:\n            pass\n",
    "def f(x):\n    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n"
    "            continue\n",
    "def f(x):\n    return 10**10**8\n",
])
def test_endless_and_slow_candidates_are_killed_at_the_deadline(sandbox, code):
    result = run(sandbox, code, timeout=KILL_AFTER)
    assert (result.passed, result.status) == (0, "timeout")


def test_a_partial_run_keeps_the_tests_it_passed(sandbox):
    code = "def f(x):\n    while x == 2:\n        pass\n    return 2 * x\n"
    result = run(sandbox, code, timeout=KILL_AFTER)
    assert (result.passed, result.status) == (2, "timeout")


def test_a_gigabyte_of_output_is_capped(sandbox):
    printer = "def f(x):\n    try:\n        for _ in range(1024):\n            print('x' * 2**20)\n    except BaseException:\n        pass\n    return 2 * x\n"
    result = run(sandbox, printer)
    assert (result.passed, result.status) == (3, "output_limit")
    flooder = ("import os\ndef f(x):\n    for _ in range(1024):\n        for fd in range(10):\n            try:\n"
               "                os.write(fd, b'{' * 2**20)\n            except OSError:\n                pass\n    return 2 * x\n")
    assert run(sandbox, flooder).passed == 0


def test_secrets_outside_are_out_of_reach(sandbox, monkeypatch):
    secret = "rvgrpo-secret-7f3a"
    monkeypatch.setenv("RVGRPO_SECRET", secret)
    code = (
        "import os, glob\n"
        "def f(secret):\n"
        "    leaks = [k for k, v in os.environ.items() if secret in v]\n"
        "    for path in ['/root', '/etc/shadow', '/etc/passwd', '/home'] + glob.glob('/proc/*/environ'):\n"
        "        try:\n"
        "            data = os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read()\n"
        "            if path.startswith('/root') or path.startswith('/etc') or path.startswith('/home') or secret.encode() in data:\n"
        "                leaks.append(path)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return leaks\n"
    )
    assert run(sandbox, code, [{"args": [secret], "expected": []}]).passed == 1


def test_no_connection_to_the_host_loopback(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = ("import socket\ndef f(port):\n    try:\n        socket.create_connection(('127.0.0.1', port), timeout=1)\n"
                "        return 'connected'\n    except OSError:\n        return 'blocked'\n")
        assert run(sandbox, code, [{"args": [port], "expected": "blocked"}]).passed == 1
        with pytest.raises(BlockingIOError):
            server.accept()


def test_writes_and_deletes_outside_the_work_directory_change_nothing(sandbox):
    host = Path(tempfile.mkdtemp(dir="/tmp"))
    host.chmod(0o777)  # only the mounts protect it, not permissions
    sentinel = host / "sentinel"
    sentinel.write_text("untouched")
    sentinel.chmod(0o666)
    code = (
        "import ctypes, os, posix\n"
        "libc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
        "def ok(rc):\n"
        "    if rc != 0:\n"
        "        raise OSError(ctypes.get_errno(), 'libc call failed')\n"
        "def f(path):\n"
        "    attempts = {\n"
        "        'os.remove': lambda: os.remove(path),\n"
        "        'posix.unlink': lambda: posix.unlink(path),\n"
        "        'ctypes.unlink': lambda: ok(libc.unlink(path.encode())),\n"
        "        'write': lambda: open(path, 'w').write('changed'),\n"
        "        'create': lambda: open(path + '.new', 'w').write('x'),\n"
        "        'usr': lambda: open('/usr/escape', 'w').write('x'),\n"
        "        'ctypes.mkdir': lambda: ok(libc.mkdir(b'/usr/escape-dir', 0o777)),\n"
        "    }\n"
        "    done = []\n"
        "    for name, attempt in attempts.items():\n"
        "        try:\n"
        "            attempt()\n"
        "            done.append(name)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return done\n"
    )
    try:
        before = sorted(host.iterdir())
        assert run(sandbox, code, [{"args": [str(sentinel)], "expected": []}]).passed == 1
        assert sentinel.read_text() == "untouched" and sorted(host.iterdir()) == before
        assert not Path("/usr/escape").exists() and not Path("/usr/escape-dir").exists()
    finally:
        shutil.rmtree(host)


def test_os_kill_minus_one_reaches_nothing_outside(sandbox):
    canaries = [subprocess.Popen(["sleep", "30"]),
                subprocess.Popen([shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                                  "sleep", "30"]) if os.geteuid() == 0 else subprocess.Popen(["sleep", "30"])]
    try:
        code = ("import os, time\ndef f(x):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                "    os.kill(-1, 9)  # every process we may signal but ourselves: here, that child\n    return 2 * x\n")
        result = run(sandbox, code)
        assert result.passed == 3
        assert all(c.poll() is None for c in canaries)
    finally:
        for canary in canaries:
            canary.kill()
            canary.wait()


def test_a_double_forked_survivor_dies_with_the_run(sandbox):
    code = ("import os, time\ndef f(x):\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n        os._exit(0)\n    return 2 * x\n")
    assert run(sandbox, code).passed == 3  # run() checks nothing is left


@pytest.mark.parametrize("code", [
    "import os\ndef f(x):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "import threading\ndef spin():\n    while True:\n        try:\n            threading.Thread(target=spin).start()\n"
    "        except BaseException:\n            pass\n\ndef f(x):\n    spin()\n",
])
def test_fork_and_thread_bombs_are_contained(confined, code):
    result = run(confined, code, timeout=KILL_AFTER)
    assert (result.passed, result.status) == (0, "timeout")


def test_a_10gb_allocation_fails(confined):
    result = run(confined, "def f(x):\n    block = bytearray(10 * 2**30)\n    return 2 * x\n")
    assert (result.passed, result.status) == (0, "completed")


def test_filling_the_disk_and_dev_shm_stops_at_the_tmpfs_cap(confined):
    mib = confined.limits.tmpfs_bytes >> 20
    code = (
        "import os\n"
        "def f(x):\n"
        "    written = []\n"
        "    for where in ('/work', '/tmp', '/dev/shm'):\n"
        "        total = 0\n"
        "        for n in range(1024):\n"
        "            try:\n"
        "                with open(f'{where}/fill{n}', 'wb') as out:\n"
        "                    out.write(b'x' * 2**20)\n"
        "                total += 1\n"
        "            except OSError:\n"
        "                break\n"
        "        written.append(total)\n"
        f"    return all(total <= {mib} for total in written)\n"
    )
    free = shutil.disk_usage("/").free
    assert run(confined, code, [{"args": [0], "expected": True}]).passed == 1
    assert free - shutil.disk_usage("/").free < 1 << 30  # unconfined, it would write 3 GiB
