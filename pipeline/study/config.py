"""The study file: one YAML naming the shared stages, the arms, the seeds and the baseline.

Structure only is checked here (keys, types, names); the stage options themselves are checked by
the stages' own option parsers when the plan is built (``pipeline.study.grid``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError
from pipeline.models import DEFAULT_MODEL

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # study and arm names become directory names
REUSE_KEY = {"stage1": "rollouts", "stage2": "export"}  # an existing dump / export instead of building one
# Options the study sets itself: in the file they would contradict the study's layout or seeds.
STUDY_SET = {
    "stage1": ("model_name", "task_name", "out_dir", "shard_index", "num_shards", "overwrite"),
    "stage2": ("rollouts", "run_name", "out_dir", "resume"),
    "stage3": ("model_name", "task_name", "out_dir", "run_name", "seed", "resume", "importance_net"),
}
SBATCH_STEPS = ("stage1", "stage2", "stage3", "aggregate")
TOP_KEYS = ("name", "model_name", "task_name", "out_dir", "stage1", "stage2", "stage3", "arms", "seeds", "baseline",
            "analysis", "slurm")


# metric -> (words for the report, unit format, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "final_accuracy": ("held-out accuracy", "{:+.3f}", True),
    "reward_auc": ("reward AUC", "{:+.4f}", True),
    "steps_to_threshold": ("steps to the reward threshold", "{:+.1f}", False),
}


@dataclass(frozen=True)
class Analysis:
    """How the report reads the runs (changing it re-aggregates; it never reruns anything)."""

    reward_threshold: float | None = None  # None: the baseline's mean final reward
    reward_window: int = 3  # steps in the moving average of the reward (final reward, threshold)
    alpha: float = 0.05  # significance level for the Holm-adjusted p-values
    bootstrap_samples: int = 10_000
    effect_of_interest: dict[str, float] = field(default_factory=dict)  # metric -> difference worth finding


@dataclass(frozen=True)
class SlurmSettings:
    shards: int = 1  # stage-1 array tasks
    max_parallel: int | None = None  # at most this many arm x seed runs at once (--array=...%N)
    sbatch: dict[str, str] = field(default_factory=dict)  # step -> extra sbatch options, e.g. "--time=02:00:00"


@dataclass(frozen=True)
class Study:
    name: str
    model_name: str
    task_name: str
    out_dir: str
    stage1: dict[str, Any]
    rollouts: str | None
    stage2: dict[str, Any]
    export: str | None
    stage3: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    baseline: str
    analysis: Analysis
    slurm: SlurmSettings
    source: Path

    def identity(self) -> dict[str, Any]:
        """What decides the runs' results: a study directory only ever holds one identity."""
        keys = ("name", "model_name", "task_name", "stage1", "rollouts", "stage2", "export", "stage3", "arms",
                "seeds", "baseline")
        return {k: getattr(self, k) for k in keys} | {"seeds": list(self.seeds)}


def _fail(source: Path, message: str) -> UserError:
    return UserError(f"{source}: {message}")


def _mapping(value: Any, where: str, source: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, f"'{where}' must be a mapping of option: value")
    return {str(k): v for k, v in value.items()}


def normalize_options(options: dict[str, Any]) -> dict[str, Any]:
    """Keys with underscores, lists as the comma-separated strings the command lines take."""
    return {k.replace("-", "_"): ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v
            for k, v in options.items()}


def _stage(data: dict[str, Any], stage: str, source: Path) -> dict[str, Any]:
    options = normalize_options(_mapping(data.get(stage), stage, source))
    taken = sorted(set(options) & set(STUDY_SET[stage]))
    if taken:
        raise _fail(source, f"{stage}: {', '.join(taken)} set by the study itself; remove them")
    return options


def _dataclass(cls: type, value: Any, where: str, source: Path) -> Any:
    options = _mapping(value, where, source)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)} in '{where}'; valid: {', '.join(sorted(known))}")
    return cls(**options)


def _seeds(value: Any, source: Path) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in value) or len(set(value)) != len(value)):
        raise _fail(source, "'seeds' must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    return tuple(value)


def _arms(value: Any, source: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not value:
        raise _fail(source, "'arms' must map each arm's name to its stage-3 options, e.g. {delta: {softmask: delta}}")
    arms = {}
    for name, options in value.items():
        if not NAME.match(str(name)):
            raise _fail(source, f"arm name '{name}' must be letters, digits, '_', '-' or '.' (it names a directory)")
        arms[str(name)] = _stage({"stage3": options}, "stage3", source)
    return arms


def _check_effects(effects: Any, source: Path) -> None:
    """The report says how many seeds each of these differences would take to detect."""
    if not isinstance(effects, dict) or not set(effects) <= set(METRICS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in effects.values()):
        raise _fail(source, f"analysis.effect_of_interest maps a metric ({', '.join(METRICS)}) to a difference > 0, "
                            "e.g. {final_accuracy: 0.05}")


def parse_study(data: Any, source: Path) -> Study:
    if not isinstance(data, dict):
        raise _fail(source, "a study file is a YAML mapping (name, arms, seeds, baseline, ...)")
    unknown = sorted(set(map(str, data)) - set(TOP_KEYS))
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(source, "'name' must be letters, digits, '_', '-' or '.' (it names the study's directory)")
    stage1 = _stage(data, "stage1", source)
    stage2 = _stage(data, "stage2", source)
    rollouts, export = stage1.pop(REUSE_KEY["stage1"], None), stage2.pop(REUSE_KEY["stage2"], None)
    arms = _arms(data.get("arms"), source)
    baseline = data.get("baseline")
    if baseline not in arms:
        raise _fail(source, f"'baseline' must name one of the arms ({', '.join(arms)}), got {baseline!r}")
    slurm = _dataclass(SlurmSettings, data.get("slurm"), "slurm", source)
    if set(slurm.sbatch) - set(SBATCH_STEPS):
        raise _fail(source, f"slurm.sbatch keys are {', '.join(SBATCH_STEPS)}")
    analysis = _dataclass(Analysis, data.get("analysis"), "analysis", source)
    if analysis.reward_window < 1 or not 0 < analysis.alpha < 1 or analysis.bootstrap_samples < 100:
        raise _fail(source, "analysis: need reward_window >= 1, 0 < alpha < 1 and bootstrap_samples >= 100")
    _check_effects(analysis.effect_of_interest, source)
    return Study(name=name, model_name=str(data.get("model_name", DEFAULT_MODEL)),
                 task_name=str(data.get("task_name", "countdown")), out_dir=str(data.get("out_dir", "rollout_dump")),
                 stage1=stage1, rollouts=rollouts, stage2=stage2, export=export,
                 stage3=_stage(data, "stage3", source), arms=arms, seeds=_seeds(data.get("seeds"), source),
                 baseline=baseline, analysis=analysis, slurm=slurm, source=source)


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every problem is one line naming the fix."""
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text())
    except OSError as err:
        raise UserError(f"cannot read study file '{source}' ({err.strerror}): pass --study FILE.yaml") from err
    except yaml.YAMLError as err:
        raise _fail(source, f"not valid YAML ({str(err).splitlines()[0]}): fix the file") from err
    return parse_study(data, source)

