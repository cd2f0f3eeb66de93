"""Running a study: locally one run after another, or as SLURM jobs; resumable either way.

A run's state is read from its directory alone: ``metadata.json`` (written last) means done,
checkpoints without it mean interrupted (stage 3's ``--resume`` continues it), nothing means new.
Every config carries ``resume: true``, so rerunning a killed study with the same command skips the
finished runs, continues the interrupted one from its newest checkpoint and starts the rest.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.errors import UserError
from pipeline.study import stages
from pipeline.study.grid import EXPORT_CONFIG, RunSpec, StudyPlan

log = logging.getLogger(__name__)
STUDY_FILE = "study.json"
DONE, INTERRUPTED, NEW = "done", "interrupted", "new"


def run_state(run_dir: Path) -> str:
    if (run_dir / "metadata.json").is_file():
        return DONE
    return INTERRUPTED if any((run_dir / "checkpoints").glob("step-*.ckpt")) else NEW


def dump_done(path: Path) -> bool:
    """A finished stage-1 dump: its metadata (one file, or one per shard for every shard)."""
    if (path / "rollouts_metadata.json").is_file():
        return True
    shards = [re.fullmatch(r"rollouts_metadata\.shard-(\d+)-of-(\d+)\.json", p.name) for p in path.glob("*.json")]
    counts = {int(m.group(2)) for m in shards if m}
    return len(counts) == 1 and sum(1 for m in shards if m) == counts.pop()


def importance_done(run_dir: Path) -> bool:
    meta = run_dir / "metadata.json"
    return ((run_dir / "export" / EXPORT_CONFIG).is_file() and meta.is_file()
            and json.loads(meta.read_text()).get("status") == "done")


def _growth_only(recorded: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The keys where ``mine`` differs from ``recorded`` other than by new arms or new seeds: a study may
    grow (its finished runs stay valid), not change."""
    changed = sorted(k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k))
    old_arms, new_arms = recorded.get("arms") or {}, mine.get("arms") or {}
    if "arms" in changed and all(new_arms.get(name) == arm for name, arm in old_arms.items()):
        changed.remove("arms")
    if "seeds" in changed and set(recorded.get("seeds") or []) <= set(mine.get("seeds") or []):
        changed.remove("seeds")
    return changed


def check_study_dir(plan: StudyPlan) -> None:
    """Refuse a study directory that was made from another study file (same name, other settings); one
    that only adds arms or seeds to it is the same study grown."""
    path = plan.study_dir / STUDY_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())["study"]
    mine = json.loads(json.dumps(plan.study.identity()))
    changed = _growth_only(recorded, mine)
    if changed:
        raise UserError(f"'{plan.study_dir}' holds study '{recorded.get('name')}' made from another study file "
                        f"(differs in: {', '.join(changed)}): give this one another name, or delete that directory")


def prepare(plan: StudyPlan) -> None:
    """Record the study and write every config file (the same files serve --local and --slurm)."""
    check_study_dir(plan)
    artifacts.ensure_writable_dir(plan.study_dir)
    path = plan.study_dir / STUDY_FILE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    identity = json.loads(json.dumps(plan.study.identity()))
    if previous.get("study") != identity:  # new, or grown by arms or seeds
        artifacts.write_json(path, {"study": identity, "study_file": str(plan.study.source.resolve()),
                                    "created": previous.get("created", artifacts.now_iso()),
                                    **({"grown": artifacts.now_iso()} if previous else {})})
    for shared in (plan.stage1, plan.stage2):
        if shared is not None:
            stages.write_config(shared.config, shared.options)
    for run in plan.runs:
        stages.write_config(run.config, run.options)


def pending_runs(plan: StudyPlan) -> list[RunSpec]:
    return [run for run in plan.runs if run_state(run.run_dir) != DONE]


def _shared_work(plan: StudyPlan) -> list[tuple[str, Path]]:
    """The shared stages still to build, in order (none once the importance net is done)."""
    if plan.stage2 is None or importance_done(plan.stage2.output):
        return []
    work = [("stage2", plan.stage2.config)]
    if plan.stage1 is not None and not dump_done(plan.stage1.output):
        work.insert(0, ("stage1", plan.stage1.config))
    return work


def run_local(plan: StudyPlan) -> None:
    """Build what is missing, then every unfinished arm x seed run, one after another, in this process."""
    prepare(plan)
    for stage, config in _shared_work(plan):
        log.info("study %s: %s (%s)", plan.study.name, stage, config)
        stages.run_in_process(stage, config)
    if plan.stage1 is not None or plan.stage2 is not None or plan.export is not None:
        log.info("study %s: importance net %s", plan.study.name, plan.export)
    total, t0 = len(plan.runs), time.perf_counter()
    for i, run in enumerate(plan.runs, 1):
        state = run_state(run.run_dir)
        if state == DONE:
            log.info("[%d/%d] %s: done, skipped", i, total, run.label)
            continue
        log.info("[%d/%d] %s: %s", i, total, run.label,
                 "resuming from its newest checkpoint" if state == INTERRUPTED else "starting")
        stages.run_in_process("stage3", run.config)
    log.info("study %s: all %d runs done (%.0f s in this process)", plan.study.name, total, time.perf_counter() - t0)


# ---- SLURM ---------------------------------------------------------------------------------------
ARRAY_CONFIGS_ENV = "RVG_ARRAY_CONFIGS"  # read by slurm/common.sh: task i runs the config on line i + 1


def _sbatch(args: list[str]) -> str:
    try:
        result = subprocess.run(["sbatch", *args], cwd=stages.ROOT, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise UserError("sbatch not found: run --slurm on a SLURM login node (or --local here)") from err
    found = re.search(r"Submitted batch job (\d+)", result.stdout)
    if result.returncode or not found:
        raise UserError(f"sbatch {' '.join(args[:3])} ... failed: {(result.stderr or result.stdout).strip()}")
    return found.group(1)


def _extra(plan: StudyPlan, step: str) -> list[str]:
    return shlex.split(plan.study.slurm.sbatch.get(step, ""))


def _after(job: str | None, kind: str = "afterok") -> list[str]:
    return [f"--dependency={kind}:{job}", "--kill-on-invalid-dep=yes"] if job else []


def submit_slurm(plan: StudyPlan) -> dict[str, str]:
    """Submit what is left: stage 1 (array over shards) -> stage 2 -> one array job over the unfinished
    arm x seed runs -> the aggregation job (afterany: a report of whatever finished). Returns job ids."""
    prepare(plan)
    jobs: dict[str, str] = {}
    previous = None
    for stage, config in _shared_work(plan):
        array = [f"--array=0-{plan.study.slurm.shards - 1}"] if stage == "stage1" else []
        previous = jobs[stage] = _sbatch([*array, *_after(previous), *_extra(plan, stage), stages.TEMPLATES[stage],
                                          "--config", str(config)])
    pending = pending_runs(plan)
    if pending:
        listing = plan.study_dir / "slurm" / f"array-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        artifacts.atomic_write(listing, lambda tmp: tmp.write_text("".join(f"{r.config}\n" for r in pending)))
        throttle = f"%{plan.study.slurm.max_parallel}" if plan.study.slurm.max_parallel else ""
        previous = jobs["stage3"] = _sbatch([
            f"--array=0-{len(pending) - 1}{throttle}", f"--job-name=rvg-study-{plan.study.name}",
            "--output=slurm/logs/%x-%A_%a.out", f"--export=ALL,{ARRAY_CONFIGS_ENV}={listing}",
            *_after(previous), *_extra(plan, "stage3"), stages.TEMPLATES["stage3"]])
    study_file = shlex.quote(str(plan.study.source.resolve()))
    aggregate = f"source slurm/common.sh && exec python run_study.py --study {study_file} --aggregate"
    jobs["aggregate"] = _sbatch([
        f"--job-name=rvg-study-{plan.study.name}-report", "--output=slurm/logs/%x-%j.out", "--ntasks=1",
        "--cpus-per-task=2", "--mem=16G", "--time=01:00:00", *_after(previous, "afterany"),
        *_extra(plan, "aggregate"), f"--wrap={shlex.join(['bash', '-c', aggregate])}"])
    return jobs


def describe_jobs(plan: StudyPlan, jobs: dict[str, str]) -> list[str]:
    pending = len(pending_runs(plan))
    names = {"stage1": "stage 1 (paired rollouts)", "stage2": "stage 2 (importance net)",
             "stage3": f"stage 3 ({pending} arm x seed runs, one array job)", "aggregate": "report (afterany)"}
    return [f"{names[step]}: job {job}" for step, job in jobs.items()] + [
        f"the report will be in {plan.study_dir}/report.md; watch: squeue --me"]
