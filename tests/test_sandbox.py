"""The sandbox against hostile candidates, in every isolation mode this machine has, and honest ones
that start processes (they score in full: processes are contained by count and lifetime, not refused).

Bombs (fork, thread, memory, disk) only run once the start-up probe has shown, in this session and
for that mode, that the process limit holds for the sandbox uid; otherwise they are skipped.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.sandbox import SandboxUnavailable, grading, isolation, probe, run_tests, seccomp
from pipeline.sandbox.cgroup import CgroupUnavailable, RunCgroups, delegated
from pipeline.sandbox.execute import execute
from pipeline.sandbox.procs import processes
from pipeline.sandbox.slots import POOL

TIMEOUT = 5.0  # for runs that should finish: generous, so a loaded machine does not fail them
KILL_AFTER = 1.5  # for runs that should be killed: short, so the file stays fast
SLACK = 2.0  # start-up, SIGKILL and the sweep
TESTS = [{"args": [i], "expected": 2 * i} for i in range(3)]
CORRECT = "def f(x):\n    return 2 * x\n"
SUBPROCESS_SOLUTION = ("import subprocess, sys\ndef f(x):\n"
                       "    done = subprocess.run([sys.executable, '-c', f'print(2 * {x})'], capture_output=True,"
                       " text=True, check=True)\n    return int(done.stdout)\n")
POOL_SOLUTION = ("import multiprocessing\ndef double(x):\n    return 2 * x\n\ndef f(x):\n"
                 "    with multiprocessing.get_context({method!r}).Pool(2) as pool:\n"
                 "        return sum(pool.map(double, [x, 0]))\n")
PROCESS_SOLUTION = ("import multiprocessing\ndef work(x, queue):\n    queue.put(2 * x)\n\ndef f(x):\n"
                    "    queue = multiprocessing.Queue()\n"
                    "    worker = multiprocessing.Process(target=work, args=(x, queue))\n"
                    "    worker.start()\n    result = queue.get()\n    worker.join()\n"
                    "    return result if worker.exitcode == 0 else None\n")


@pytest.fixture(scope="module", params=isolation.MODES)
def sandbox(request):
    try:
        return probe(request.param)
    except SandboxUnavailable as err:
        pytest.skip(f"{request.param}: {err}")


@pytest.fixture(autouse=True)
def nothing_outlives_its_sandbox(caplog):
    """As root, the uid sweep after each run warns of any process that the end of the run's PID
    namespace should have taken along: none may (leftovers() only sees what the sweep missed)."""
    yield
    assert not [r.getMessage() for r in caplog.records if "outlived" in r.getMessage()]


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
    assert 0 < report.checks["forks"] < report.limits.processes
    assert report.checks["detached_sleeper"] and report.checks["outlived_run"] == 0
    assert report.checks["oom_score_adj"] == 1000
    assert report.mode in report.summary() and "every descendant killed at the end of a run" in report.summary()


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
                  f"forked = run_tests({SUBPROCESS_SOLUTION!r}, 'f', {TESTS!r}, report=r)\n"
                  "print(json.dumps({'mode': r.mode, 'as_root': r.as_root, 'forks': r.checks['forks'],"
                  " 'limit': r.limits.processes, 'uid': r.checks['uid'], 'outlived': r.checks['outlived_run'],"
                  " 'passed': res.passed, 'forked_passed': forked.passed}))\n")
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
                       "uid": 65534, "outlived": 0, "passed": 3, "forked_passed": 3}
        assert 0 < out["forks"] < out["limit"]


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
                "    try:\n        os.kill(-1, 9)  # every process we may signal but ourselves\n"
                "    except ProcessLookupError:  # none: we are alone\n        pass\n    return 2 * x\n")
        result = run(sandbox, code)
        assert result.passed == 3
        assert all(c.poll() is None for c in canaries)
    finally:
        for canary in canaries:
            canary.kill()
            canary.wait()


def test_a_double_forked_survivor_dies_with_the_run(sandbox):
    code = ("import os, time\ndef f(x):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n            time.sleep(60)\n        os._exit(0)\n    return 2 * x\n")
    assert run(sandbox, code).passed == 3  # run() checks nothing is left


# the first test starts a daemonised sleeper (own session, its parent gone) and passes once it runs
DAEMON = ("import ctypes, os, time\ndef f(x):\n    if x == 0:\n        ready = os.pipe()\n        if os.fork() == 0:\n"
          "            os.setsid()\n            if os.fork() == 0:\n                os.write(ready[1], b'.')\n"
          "                time.sleep(60)\n            os._exit(0)\n        return 2 * x if os.read(ready[0], 1) else None\n")


@pytest.mark.parametrize("end, timeout, passed, status", [
    ("    return 2 * x\n", TIMEOUT, 3, "completed"),
    ("    ctypes.string_at(0)  # SIGSEGV: the harness crashes\n", TIMEOUT, 1, "exited_early"),
    ("    while True:\n        pass\n", KILL_AFTER, 1, "timeout"),
], ids=["returns", "crashes", "times-out"])
def test_a_background_child_is_killed_however_the_run_ends(sandbox, end, timeout, passed, status):
    result = run(sandbox, DAEMON + end, timeout=timeout)  # run() checks nothing is left
    assert (result.passed, result.status) == (passed, status)


@pytest.mark.parametrize("code", [SUBPROCESS_SOLUTION, POOL_SOLUTION.format(method="fork"),
                                  POOL_SOLUTION.format(method="spawn"), PROCESS_SOLUTION],
                         ids=["subprocess", "pool-fork", "pool-spawn", "process"])
def test_honest_solutions_that_start_processes_score_in_full(sandbox, code):
    result = run(sandbox, code)
    assert (result.passed, result.total, result.status) == (3, 3, "completed")


def test_forking_solutions_get_the_full_coding_reward():
    """The trainer's path: the coding task's reward, run_batch, the default mode."""
    from pipeline.tasks.coding import tests_passed

    try:
        probe()
    except SandboxUnavailable as err:
        pytest.skip(str(err))
    solutions = [f"```python\n{code}```" for code in (SUBPROCESS_SOLUTION, POOL_SOLUTION.format(method="fork"))]
    rewards = tests_passed(["q"] * 2, solutions, entry_point=["f"] * 2, tests=[json.dumps(TESTS)] * 2)
    assert rewards == [1.0, 1.0]
    assert leftovers() == []


def bomb(report, code: str) -> tuple[grading.TestResult, int]:
    """run() while counting, from outside, the tasks under the sandbox uids: the result and their peak."""
    peak, stop = [0], threading.Event()

    def count() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(p.threads for p in processes() if p.uid in POOL.claimed))
            time.sleep(0.01)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        return run(report, code, timeout=KILL_AFTER), peak[0]
    finally:
        stop.set()
        counter.join()


@pytest.mark.parametrize("code", [
    "import os\ndef f(x):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "import threading\ndef spin():\n    while True:\n        try:\n            threading.Thread(target=spin).start()\n"
    "        except BaseException:\n            pass\n\ndef f(x):\n    spin()\n",
], ids=["fork", "thread"])
def test_fork_and_thread_bombs_are_contained(confined, code):
    result, peak = bomb(confined, code)  # run() checks nothing is left
    assert (result.passed, result.status) == (0, "timeout")
    if os.geteuid() == 0:  # a dedicated uid: its tasks are the run's, launchers included
        assert confined.limits.processes // 2 < peak <= confined.limits.processes


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


BALLOON_TIMEOUT = 30.0  # the contained balloons end in well under a second; a loaded machine gets room
SHM_BALLOON = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def f(target_mib):
    held = 0  # create a segment, fill it, detach, repeat: the memory belongs to no process
    while held < target_mib:
        segment = libc.shmget(0, 256 << 20, 0o600)
        if segment < 0:
            break
        address = libc.shmat(segment, None, 0)
        if address in (None, 2**64 - 1):
            break
        ctypes.memset(address, 1, 256 << 20)
        libc.shmdt(ctypes.c_void_p(address))
        held += 256
    return held
"""
MEMFD_BALLOON = """
import os
def f(target_mib):
    anonymous = b'x' * (768 << 20)  # inside the address space
    held, files = 768, []
    while held < target_mib:
        try:  # a memfd's pages are out of the address space once unmapped (16 MiB: RLIMIT_FSIZE)
            fd = os.memfd_create('balloon')
            for _ in range(16):
                os.write(fd, b'x' * (1 << 20))
        except OSError:
            break
        files.append(fd)
        held += 16
    return held
"""
FORK_CHILD_MIB = 64
FORK_BALLOON = f"""
import os, time
def f(target_mib):
    held, ready = 0, os.pipe()
    while held < target_mib:  # each child has an address space of its own
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            try:
                block = b'x' * ({FORK_CHILD_MIB} << 20)
                os.write(ready[1], b'.')
                time.sleep(60)
            finally:
                os._exit(0)
        os.read(ready[0], 1)
        held += {FORK_CHILD_MIB}
    return held
"""


def balloon_target_mib(limits: isolation.Limits) -> int:
    return (limits.run_memory_bytes >> 20) + 512


def held_mib(report, balloon: str) -> int | None:
    """What a balloon reached, aiming 512 MiB past the per-run total; None: the run was killed."""
    target = balloon_target_mib(report.limits)
    run = execute(report.mode, report.limits, balloon, "f", [[target]], BALLOON_TIMEOUT, report.cgroups)
    assert run.survivors == 0 and leftovers() == []
    record = run.records[0]
    return record["value"] if record and "value" in record else None


@pytest.mark.parametrize("balloon", [SHM_BALLOON, MEMFD_BALLOON, FORK_BALLOON], ids=["shm", "memfd", "fork"])
def test_a_run_holds_no_more_than_its_memory_total(confined, balloon):
    held = held_mib(confined, balloon)
    limits = confined.limits
    if balloon is not FORK_BALLOON and confined.checks["seccomp"]:  # refused: it stops where it began,
        assert held is not None and held <= limits.address_space_bytes >> 20  # or at its address space
    elif confined.cgroups:  # past memory.max the kernel kills the run
        assert held is None or held <= limits.run_memory_bytes >> 20
    else:  # the filter alone: RLIMIT_NPROC stops the children short of the target, each under RLIMIT_AS
        assert held is not None and held <= FORK_CHILD_MIB * limits.processes < balloon_target_mib(limits)


@pytest.mark.skipif(os.geteuid() != 0, reason="the unshare fallback needs root")
def test_the_memory_cgroup_alone_holds_the_fork_balloon(monkeypatch):
    probe_module = sys.modules["pipeline.sandbox.probe"]
    if probe_module._memory_cgroups()[0] is None:
        pytest.skip(f"no memory cgroup here: {probe_module._memory_cgroups()[1]}")
    monkeypatch.setattr(sys.modules["pipeline.sandbox.execute"], "FILTER", None)
    probe.cache_clear()
    try:
        report = probe()
        assert not report.checks["seccomp"] and report.cgroups is not None
        held = held_mib(report, FORK_BALLOON)
        assert held is None or held <= report.limits.run_memory_bytes >> 20
    finally:
        probe.cache_clear()


def test_without_the_filter_or_a_memory_cgroup_code_tasks_are_refused(monkeypatch):
    monkeypatch.setattr(sys.modules["pipeline.sandbox.execute"], "FILTER", None)
    monkeypatch.setattr(sys.modules["pipeline.sandbox.probe"], "_memory_cgroups", lambda: (None, "none in this test"))
    probe.cache_clear()
    try:
        for mode in isolation.modes_for_this_user():
            if isolation.missing_tools(mode):
                continue
            with pytest.raises(SandboxUnavailable) as err:
                probe(mode)
            assert "\n" not in str(err.value)
            assert "no memory cap per run: shmget, msgget, semget" in str(err.value)
            assert "no memory cgroup (none in this test)" in str(err.value)
    finally:
        probe.cache_clear()


def available_modes() -> list[str]:
    return [mode for mode in isolation.modes_for_this_user() if not isolation.missing_tools(mode)]


def test_a_process_limit_that_does_not_hold_is_refused_in_one_line(monkeypatch):
    """Where RLIMIT_NPROC is not what Limits says (here: 16 more), forks pass the limit: refused."""
    execute_module = sys.modules["pipeline.sandbox.execute"]
    real = execute_module.command

    def loose(mode: str, uid: int, limits: isolation.Limits, timeout_s: float) -> list[str]:
        return [f"--nproc={int(arg.split('=')[1]) + 16}" if arg.startswith("--nproc=") else arg
                for arg in real(mode, uid, limits, timeout_s)]

    monkeypatch.setattr(execute_module, "command", loose)
    probe.cache_clear()
    try:
        for mode in available_modes():
            with pytest.raises(SandboxUnavailable) as err:
                probe(mode)
            assert "\n" not in str(err.value) and "under RLIMIT_NPROC 24, limit ignored" in str(err.value)
    finally:
        probe.cache_clear()


def test_a_descendant_that_outlives_the_run_is_refused_and_killed():
    """A process under the probe's sleeper name still running after the run: refused, and killed."""
    if not available_modes():
        pytest.skip("no isolation tools here")
    probe.cache_clear()
    name = f"rvgrpo-{os.getpid()}".encode()
    canary = subprocess.Popen([sys.executable, "-c", f"import ctypes, time\nctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)\n"
                               "print(flush=True)\ntime.sleep(30)\n"], stdout=subprocess.PIPE)
    try:
        canary.stdout.readline()  # named
        with pytest.raises(SandboxUnavailable) as err:
            probe(available_modes()[0])
        assert "\n" not in str(err.value) and "outlived_run is 1, expected 0" in str(err.value)
        assert canary.wait(timeout=5) == -9
    finally:
        canary.kill()
        canary.wait()
        canary.stdout.close()
        probe.cache_clear()


def test_new_namespaces_and_ptrace_stay_refused_to_processes(sandbox):
    """clone may make processes, not namespaces (a user namespace could mount an uncapped tmpfs);
    no process may trace another (before Linux 4.8 a tracer could rewrite calls the filter passed)."""
    if not sandbox.checks["seccomp"]:
        pytest.skip(f"{sandbox.mode}: no seccomp filter here")
    clone = seccomp.ARCHES[seccomp.machine()][1]["clone"]
    code = (
        "import ctypes, os, signal, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "FLAGS = {'user': 0x10000000, 'net': 0x40000000, 'pid': 0x20000000, 'mount': 0x00020000,\n"
        "         'ipc': 0x08000000, 'uts': 0x04000000, 'cgroup': 0x02000000}\n"
        "def f(x):\n"
        "    worked = []\n"
        "    for name, flag in FLAGS.items():\n"
        f"        pid = libc.syscall(ctypes.c_long({clone}), ctypes.c_long(flag | 17), *[ctypes.c_long(0)] * 4)\n"
        "        if pid == 0:\n"
        "            os._exit(0)\n"
        "        if pid > 0:\n"
        "            os.waitpid(pid, 0)\n"
        "            worked.append(name)\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(60)\n"
        "    if libc.ptrace(16, child, None, None) == 0:  # PTRACE_ATTACH\n"
        "        worked.append('ptrace')\n"
        "    os.kill(child, signal.SIGKILL)\n"
        "    os.waitpid(child, 0)\n"
        "    return worked\n"
    )
    assert run(sandbox, code, [{"args": [0], "expected": []}]).passed == 1


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI exists on x86_64 only")
def test_x32_system_calls_end_the_run(sandbox):
    if not sandbox.checks["seccomp"]:
        pytest.skip(f"{sandbox.mode}: no seccomp filter here")
    code = ("import ctypes\ndef f(x):\n    ctypes.CDLL(None).syscall(0x40000000 | 29, 0, 4096, 0o600)  # x32 shmget\n"
            "    return 2 * x\n")
    assert run(sandbox, code).status == "exited_early"


def test_the_mount_table_shows_only_the_sandbox(sandbox):
    host = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    code = ("def f(x):\n    seen = {}\n    for path in ('/proc/1/mountinfo', '/proc/self/mountinfo'):\n"
            "        for line in open(path):\n            fields = line.split()\n"
            "            seen[fields[4]] = fields[fields.index('-') + 1]\n    return seen\n")
    record = execute(sandbox.mode, sandbox.limits, code, "f", [[0]], TIMEOUT, sandbox.cgroups).records[0]
    seen = record["value"]
    assert seen["/"] == "tmpfs"  # not the host's root file system
    foreign = host - set(isolation.MOUNT_POINTS) - {m for m in host if m.startswith("/dev/")}
    assert foreign and not foreign & set(seen)
    assert set(seen) <= set(isolation.MOUNT_POINTS) | {m for m in seen if m.startswith("/dev/")}


KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
KEYS = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl


def add_key(description: str, payload: bytes, keyring: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(KEYS[platform.machine()][0], b"user", description.encode(), payload, len(payload), keyring)


@pytest.mark.skipif(platform.machine() not in KEYS, reason="key syscall numbers known for x86_64 and aarch64")
def test_no_key_reaches_a_run_from_the_trainer_or_an_earlier_run(sandbox):
    """Keys a run stores are gone in the next run; the trainer's session keyring is not the run's."""
    trainer_key = add_key("rvgrpo-trainer-key", b"trainer-secret", KEY_SPEC_SESSION_KEYRING)
    assert trainer_key > 0
    code = (
        "import ctypes, platform\n"
        f"ADD_KEY, KEYCTL = {KEYS}[platform.machine()]\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def f(step):\n"
        "    if step == 'store':\n"
        "        return [libc.syscall(ADD_KEY, b'user', b'rvgrpo-run-key', b'run-secret', 10, ring) > 0\n"
        "                for ring in (-3, -4, -5)]\n"
        "    found = [libc.syscall(KEYCTL, 10, ring, b'user', name, 0) > 0  # KEYCTL_SEARCH\n"
        "             for ring in (-3, -4, -5) for name in (b'rvgrpo-run-key', b'rvgrpo-trainer-key')]\n"
        "    try:\n"
        "        listed = open('/proc/keys').read()\n"
        "    except OSError:\n"
        "        listed = ''\n"
        "    return any(found) or 'rvgrpo-' in listed\n"
    )
    try:
        stored = run(sandbox, code, [{"args": ["store"], "expected": [False] * 3}])
        assert run(sandbox, code, [{"args": ["find"], "expected": False}]).passed == 1
        assert stored.passed == 1  # the filter refuses add_key
    finally:
        ctypes.CDLL(None).syscall(KEYS[platform.machine()][1], 3, trainer_key)  # KEYCTL_REVOKE


def test_a_run_cgroup_gets_its_limit_and_the_command_its_pid(tmp_path):
    """The prefix moves the shell into the run's cgroup and execs, so the command itself is inside."""
    with RunCgroups(tmp_path).run(64 << 20, 24) as enter:
        group = Path(enter[-1]).parent
        started = subprocess.run([*enter, "/bin/sh", "-c", "echo $$"], capture_output=True, text=True, timeout=30)
        assert (group / "cgroup.procs").read_text().split() == [started.stdout.strip()]
        assert (group / "memory.max").read_text() == str(64 << 20)
        assert (group / "memory.oom.group").read_text() == "1"
        assert not (group / "pids.max").exists()  # no pids controller delegated
    with RunCgroups(tmp_path, pids=True).run(64 << 20, 24) as enter:
        assert (Path(enter[-1]).parent / "pids.max").read_text() == "24"


def test_a_memory_cgroup_is_proven_or_refused_in_one_line():
    try:
        cgroups = delegated()
        cgroups.prove()
    except CgroupUnavailable as err:
        assert str(err) and "\n" not in str(err)
        return
    assert "memory" in (cgroups.base / "cgroup.subtree_control").read_text().split()


def test_a_filter_that_does_not_go_on_means_the_candidate_never_runs(sandbox, monkeypatch):
    monkeypatch.setattr(sys.modules["pipeline.sandbox.execute"], "FILTER", bytes(8))  # no return: EINVAL
    result = run(sandbox, CORRECT)
    assert (result.passed, result.status) == (0, "load_error")
    assert result.detail == "sandbox: seccomp filter failed (errno 22)"
