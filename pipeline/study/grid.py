"""The study's plan: where everything goes, the shared stage-1/2 runs, and the arm x seed stage-3 runs.

Building the plan parses every run's options with its stage's parser, so a bad option anywhere
fails before anything is written or trained. Paths are absolute: the same config files work from
any directory and on SLURM nodes.

Layout: ``<out_dir>/<task>/<model>/studies/<name>/`` holds ``study.json``, ``configs/`` (every
run's --config file) and ``runs/<arm>/seed-<s>/``: ordinary stage-3 run directories, reached with
stage 3's own naming (``grpo/<run_name>`` with run_name ``../studies/<name>/runs/<arm>/seed-<s>``).
The stage-1 dump and stage-2 run sit where those stages put them, named by their options, so
another study with the same settings reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import stage_dir
from pipeline.errors import UserError
from pipeline.grpo.config import NEEDS_IMPORTANCE, GRPOArgs, validate
from pipeline.models import model_slug
from pipeline.study import stages
from pipeline.study.config import Study
from pipeline.tasks import task_slug

EXPORT_CONFIG = "importance_net.json"


@dataclass(frozen=True)
class RunSpec:
    """One arm x seed stage-3 run."""

    arm: str
    seed: int
    run_dir: Path
    config: Path
    options: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


@dataclass(frozen=True)
class SharedStage:
    """Stage 1 or 2 as the study builds it (absent when the file points at an existing output)."""

    config: Path
    options: dict[str, Any]
    output: Path  # the dump directory / the stage-2 run directory


@dataclass(frozen=True)
class StudyPlan:
    study: Study
    study_dir: Path
    stage1: SharedStage | None
    stage2: SharedStage | None
    rollouts: Path | None
    export: Path | None  # what the arms that read f get as --importance_net
    runs: tuple[RunSpec, ...]  # seed-major: every arm of seed s before seed s + 1

    @property
    def importance_run_dir(self) -> Path | None:
        """The stage-2 run directory (plots, metadata) behind the export, when there is one."""
        return self.export.parent if self.export is not None else None


def _name(study: Study, resolved: dict[str, Any]) -> str:
    """``<study>-<digest>`` of every value a stage will run with (``stages.parse``), its defaults included: a
    default that changes between releases names a new dump or net, rather than the study reusing one made
    with the old."""
    return f"{study.name}-{hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def _plan_stage1(study: Study, configs: Path, out_dir: Path) -> SharedStage:
    from pipeline.stage1 import Stage1Args, dump_dir

    options = {**study.stage1, "model_name": study.model_name, "task_name": study.task_name, "out_dir": str(out_dir)}
    params = stages.parse("stage1", options, "stage1")
    if "tag" not in options:  # the dump's path, known before it exists
        options["tag"] = params["tag"] = _name(study, params)
    return SharedStage(configs / "stage1.yaml", options, dump_dir(Stage1Args(**params)).resolve())


def _plan_stage2(study: Study, configs: Path, rollouts: Path) -> SharedStage:
    from pipeline.importance.train import default_run_dir

    options = {**study.stage2, "rollouts": str(rollouts)}
    run_name = _name(study, stages.parse("stage2", options, "stage2"))
    options.update(run_name=run_name, resume=True)
    return SharedStage(configs / "stage2.yaml", options, default_run_dir(rollouts, run_name, None))


def _existing(path: str, what: str, check: Path) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not (resolved / check).exists():
        raise UserError(f"{what} '{path}' not found (no {check} in it): fix the path or drop the key to build one")
    return resolved


def _plan_run(study: Study, arm: str, seed: int, study_dir: Path, out_dir: Path,
              export: Path | None) -> RunSpec:
    from pipeline.grpo.train import run_dir_for

    run_dir = study_dir / "runs" / arm / f"seed-{seed}"
    grpo_dir = stage_dir(out_dir, task_slug(study.task_name), model_slug(study.model_name)) / "grpo"
    options = {**study.stage3, **study.arms[arm], "model_name": study.model_name, "task_name": study.task_name,
               "out_dir": str(out_dir), "run_name": os.path.relpath(run_dir, grpo_dir), "seed": seed, "resume": True}
    where = f"arm '{arm}'"
    params = stages.parse("stage3", options, where)
    if params["softmask"] in NEEDS_IMPORTANCE and params["importance"] != "oracle":  # the oracle reads the task
        options["importance_net"] = str(export)
        params["importance_net"] = str(export)
    args = GRPOArgs(**params)
    try:
        validate(args)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    if run_dir_for(args).resolve() != run_dir:
        raise RuntimeError(f"stage 3 would write {run_dir_for(args)}, not {run_dir}: its run naming changed")
    return RunSpec(arm, seed, run_dir, study_dir / "configs" / arm / f"seed-{seed}.yaml", options)


def build_plan(study: Study) -> StudyPlan:
    """Every path and every run's options, all checked; nothing is written."""
    out_dir = Path(study.out_dir).expanduser().resolve()
    study_dir = stage_dir(out_dir, task_slug(study.task_name), model_slug(study.model_name)) / "studies" / study.name
    configs = study_dir / "configs"
    softmasks = {arm: stages.parse("stage3", {**study.stage3, **options}, f"arm '{arm}'")["softmask"]
                 for arm, options in study.arms.items()}
    stage1 = stage2 = rollouts = export = None
    if study.export:
        export = _existing(study.export, "stage2.export", Path(EXPORT_CONFIG))
    elif any(mode in NEEDS_IMPORTANCE for mode in softmasks.values()):
        if study.rollouts:
            rollouts = _existing(study.rollouts, "stage1.rollouts", Path("."))
        else:
            stage1 = _plan_stage1(study, configs, out_dir)
            rollouts = stage1.output
        stage2 = _plan_stage2(study, configs, rollouts)
        export = stage2.output / "export"
    runs = tuple(_plan_run(study, arm, seed, study_dir, out_dir, export) for seed in study.seeds for arm in study.arms)
    return StudyPlan(study, study_dir, stage1, stage2, rollouts, export, runs)
