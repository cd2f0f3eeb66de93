"""The start-up self-test: run a payload in each isolation mode and accept the first whose limits
demonstrably hold (above all the process limit: a fork bomb under a limit that does not hold would
take the machine down; that no descendant outlives its run; and the memory per run: the seccomp
filter, a memory cgroup, or both). Nothing else in this package runs code before this has passed."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from pipeline.sandbox import seccomp
from pipeline.sandbox.cgroup import CgroupUnavailable, RunCgroups, delegated
from pipeline.sandbox.execute import execute
from pipeline.sandbox.isolation import (
    MOUNT_POINTS,
    IsolationReport,
    Limits,
    SandboxUnavailable,
    missing_tools,
    modes_for_this_user,
)
from pipeline.sandbox.procs import kill, processes

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 15.0
MAX_VISIBLE_PIDS = 4  # the probe itself (and unshare's root shell): anything more is the host's
OOM_SCORE_ADJ_MAX = 1000
CHECK_SOURCE = Path(__file__).with_name("probe_check.py").read_text()


@functools.cache
def probe(mode: str | None = None, limits: Limits | None = None) -> IsolationReport:
    """The isolation this machine gives (``mode`` forces one), or SandboxUnavailable in one line."""
    limits = limits or Limits()
    failures = []
    for candidate in (mode,) if mode else modes_for_this_user():
        try:
            report = _probe_mode(candidate, limits)
            log.info(report.summary())
            return report
        except SandboxUnavailable as err:
            failures.append(f"{candidate}: {err}")
    install = "install bubblewrap (apt-get install bubblewrap) and " if "bwrap" in missing_tools("bubblewrap") else ""
    raise SandboxUnavailable(
        f"code tasks refused, no working sandbox here ({'; '.join(failures) or 'not root: only bubblewrap works'}); "
        f"{install}see docs/sandbox.md")


def _probe_mode(mode: str, limits: Limits) -> IsolationReport:
    if mode not in modes_for_this_user():
        raise SandboxUnavailable("needs root")
    missing = missing_tools(mode)
    if missing:
        raise SandboxUnavailable(f"missing {', '.join(missing)}")
    cgroups, cgroup_note = _memory_cgroups()
    sleeper = f"rvgrpo-{os.getpid()}"  # what the payload names the descendant it leaves behind
    clone = seccomp.ARCHES[seccomp.machine()][1]["clone"] if seccomp.machine() in seccomp.ARCHES else None
    run = execute(mode, limits, CHECK_SOURCE, "check", [[2 * limits.address_space_bytes, sleeper, clone]],
                  PROBE_TIMEOUT_S, cgroups)
    alive = [p.pid for p in processes() if p.name == sleeper]
    kill(alive)
    record = run.records[0]
    if record is None or "value" not in record:
        said = run.stderr_tail.strip().splitlines()
        reason = (run.load_error or (record or {}).get("error") or ("timed out" if run.timed_out else None)
                  or (said[-1] if said else "no result"))
        raise SandboxUnavailable(f"probe did not run ({reason})")
    checks = record["value"]
    checks["seccomp"] = checks.get("memory_outside_address_space") == []
    checks["cgroup"] = cgroup_note
    checks["outlived_run"] = run.survivors + len(alive)
    problems = _problems(checks, limits, cgroups)
    if problems:
        raise SandboxUnavailable("; ".join(problems))
    return IsolationReport(mode=mode, as_root=os.geteuid() == 0, limits=limits, checks=checks, cgroups=cgroups)


@functools.cache
def _memory_cgroups() -> tuple[RunCgroups | None, str]:
    """A memory cgroup per run where the machine delegates one and it demonstrably holds, else why not."""
    try:
        cgroups = delegated()
        cgroups.prove()
    except CgroupUnavailable as err:
        return None, str(err)
    return cgroups, str(cgroups.base)


def _problems(checks: dict, limits: Limits, cgroups: RunCgroups | None) -> list[str]:
    """Every way the probe's view differs from what the sandbox promises."""
    expected = {
        "capabilities": False, "root_dir_visible": False, "etc_visible": False,
        "writable_outside_work": [], "work_writable": True, "allocates_beyond_limit": False,
        "oom_score_adj": OOM_SCORE_ADJ_MAX, "detached_sleeper": True, "outlived_run": 0,
    }
    problems = [f"{key} is {checks.get(key)!r}, expected {want!r}" for key, want in expected.items()
                if checks.get(key) != want]
    if checks.get("uid") in (0, None):
        problems.append("runs as root")
    for kind in ("forks", "threads"):
        if checks.get(kind, limits.processes) >= limits.processes:
            problems.append(f"{kind}: {checks.get(kind)} under RLIMIT_NPROC {limits.processes}, limit ignored")
    if checks.get("forks") == 0:
        problems.append("no process can be started, so a solution using subprocess would score 0 here")
    if not checks["seccomp"] and cgroups is None:
        escapes = checks.get("memory_outside_address_space") or ["?"]
        problems.append(f"no memory cap per run: {', '.join(escapes)} possible and no memory cgroup "
                        f"({checks['cgroup']})")
    host_mounts = [m for m in checks.get("mounts", ["?"]) if m not in MOUNT_POINTS and not m.startswith("/dev/")]
    if host_mounts:
        problems.append(f"host mounts visible: {host_mounts[:5]}")
    if set(checks.get("interfaces", ["?"])) - {"lo"}:
        problems.append(f"network interfaces {checks.get('interfaces')}")
    if set(checks.get("environment") or []) - {"PWD", "LC_CTYPE"}:
        problems.append(f"environment not cleared: {checks.get('environment')}")
    if checks.get("visible_pids", MAX_VISIBLE_PIDS + 1) > MAX_VISIBLE_PIDS:
        problems.append("host processes visible (no PID namespace)")
    return problems
