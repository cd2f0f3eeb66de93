"""Shared CLI plumbing for the three stages: option spellings, ``--config`` files, validated value types,
and one-line errors with exit code 2 for anything the user can fix.

Every option is declared with ``option(name, aliases=(...), type=..., ...)``: ``--model_name``,
``--model-name`` and each alias (TRL's names, e.g. ``aliases=("num_generations",)``) set the same parameter,
errors name the seed spelling, and a ``--config`` YAML file may use any of these spellings as keys.

Every value is checked at parse time by one of the shared types below. New options use them too, so that
bad input fails before any model loads or anything is written (tests/test_bad_input.py holds the cases):

- counts and sizes: ``POSITIVE_INT`` (>= 1), ``NON_NEGATIVE_INT`` (>= 0), ``int_at_least(n)``;
- real numbers, always finite: ``POSITIVE_FLOAT`` (> 0), ``NON_NEGATIVE_FLOAT`` (>= 0, e.g. learning rates),
  ``UNIT_INTERVAL`` [0, 1] (quantiles, strengths, ratios), ``OPEN_UNIT_INTERVAL`` (0, 1] (``top_p``, memory
  shares), ``FRACTION`` (0, 1);
- ``LEVELS`` (non-empty comma-separated levels >= 0, or a YAML list), ``DIR_NAME`` (one directory name: a
  dump's tag), ``RUN_NAME`` (a run directory, possibly a relative path), ``MAPPING`` (a YAML/JSON mapping),
  and ``report_to_option`` (``--report_to``);
- Lightning's: ``DEVICES``, ``ACCELERATOR``, ``STRATEGY``, ``PRECISION``, checked against Lightning's own
  registries. ``check_lightning(accelerator=..., devices=..., strategy=..., precision=...)`` then builds the
  Fabric (nothing launched), so Lightning checks them together (device ids on a CPU, FSDP without a GPU)
  before anything is written; ``lightning_devices`` turns ``--devices`` into Lightning's value.

Checks that need several options or the files go into each stage's ``validate`` and raise ``UserError``.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.errors import UserError

VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


class StageCommand(click.Command):
    """Usage errors (bad option value, unreadable --config) as one line and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()}", err=True)
            raise SystemExit(2) from err


class StageOption(click.Option):
    """Names itself in errors by its seed spelling only (not every alias)."""

    def get_error_hint(self, ctx: click.Context) -> str:
        return f"'{self.opts[0]}'"


def stage_command() -> Callable:
    return click.command(cls=StageCommand, context_settings={"help_option_names": ["-h", "--help"]})


def option(name: str, *, aliases: Iterable[str] = (), **kwargs: Any) -> Callable:
    """``--model_name``, ``--model-name`` and every alias (and its dashed form) set ``model_name``."""
    flags: list[str] = []
    for spelling in (name, *aliases):
        for flag in (f"--{spelling}", f"--{spelling.replace('_', '-')}"):
            if flag not in flags:
                flags.append(flag)
    return click.option(*flags, name, cls=StageOption, show_default=True, **kwargs)


def _spellings(command: click.Command) -> dict[str, str]:
    """Every accepted config key (seed, dashed and alias spellings) -> parameter name."""
    names = {}
    for param in command.params:
        names[param.name] = param.name
        for flag in getattr(param, "opts", ()):
            names[flag.lstrip("-").replace("-", "_")] = param.name
    return names


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise click.BadParameter(f"cannot read '{value}' as YAML ({type(err).__name__}): fix the file") from err
    if not isinstance(data, dict):
        raise click.BadParameter(f"'{value}' must be a YAML mapping of option: value")
    spellings = _spellings(ctx.command)
    spellings.pop("config", None)
    params = {param.name: param for param in ctx.command.params}
    config = {}
    for key, setting in data.items():
        name = spellings.get(str(key).replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"unknown key '{key}' in '{value}'; valid keys: "
                                     f"{', '.join(sorted(set(spellings.values())))}")
        if name in config:
            raise click.BadParameter(f"'{value}' sets {name} twice (as '{key}' and another spelling): keep one")
        multiple = getattr(params[name], "multiple", False)
        config[name] = [setting] if multiple and isinstance(setting, str) else setting
    ctx.default_map = {**(ctx.default_map or {}), **config}
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
    help="YAML file of option defaults (command-line flags win).",
)


# ---- value types -------------------------------------------------------------------------------------------
def int_at_least(low: int) -> click.IntRange:
    return click.IntRange(min=low)


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)


class Real(click.FloatRange):
    """A finite float in a range (click's FloatRange lets nan and inf through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE_FLOAT = Real(min=0, min_open=True)
NON_NEGATIVE_FLOAT = Real(min=0)
UNIT_INTERVAL = Real(min=0, max=1)
OPEN_UNIT_INTERVAL = Real(min=0, max=1, min_open=True)
FRACTION = Real(min=0, max=1, min_open=True, max_open=True)


class LevelList(click.ParamType):
    """``0,1,2`` (or a YAML list) -> (0, 1, 2): non-empty, each level >= 0."""

    name = "levels"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            levels = tuple(int(str(v).strip()) for v in parts if str(v).strip() != "")
        except ValueError:
            self.fail(f"{value!r}: give comma-separated integers, e.g. 0,1,2,3", param, ctx)
        if not levels:
            self.fail("give at least one level, e.g. 0,1,2,3", param, ctx)
        if min(levels) < 0:
            self.fail(f"{value!r}: levels are integers >= 0", param, ctx)
        return levels


LEVELS = LevelList()


class DirName(click.ParamType):
    """One directory name (a dump's tag), never a path that leaves the output directory."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text or text in (".", "..") or "/" in text or "\\" in text or text.startswith("."):
            self.fail(f"{text!r} must be a plain directory name (no '/', not starting with '.')", param, ctx)
        return text


class RunName(click.ParamType):
    """A run directory below the stage's runs directory: a name, or a relative path (a study puts its runs
    elsewhere with ``../``), never empty or ending in '.' or '..'."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip() or Path(text).name in ("", ".", "..") or text.endswith("/"):
            self.fail(f"{text!r} must name a run directory, e.g. my-run", param, ctx)
        return text


DIR_NAME = DirName()
RUN_NAME = RunName()


class YamlMapping(click.ParamType):
    """A YAML/JSON mapping given inline (``'{sigma: 0.5}'``) or as a mapping in a --config file."""

    name = "mapping"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict:
        if isinstance(value, Mapping):
            return dict(value)
        try:
            parsed = yaml.safe_load(value) if value else {}
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a YAML/JSON mapping; give e.g. '{{sigma: 0.5, mu_exp: 0.5}}'", param, ctx)
        return parsed


MAPPING = YamlMapping()


def report_to_option(fn: Callable) -> Callable:
    """``--report_to tensorboard,wandb`` (comma-separated or repeated): experiment trackers besides metrics.csv
    (stages 2 and 3); pipeline/trackers.py checks the names here, and their packages before a run starts."""
    from pipeline.trackers import TRACKERS, parse_report_to

    def parse(_ctx: click.Context, _param: click.Parameter, value: Any) -> tuple[str, ...]:
        try:
            return parse_report_to([name for item in value or () for name in str(item).split(",")])
        except UserError as err:
            raise click.BadParameter(str(err)) from err

    return option("report_to", multiple=True, default=("csv",), callback=parse,
                  help=f"Trackers: {', '.join(TRACKERS)}; comma-separated or repeated (metrics.csv is always "
                       "written).")(fn)


# ---- Lightning's options -----------------------------------------------------------------------------------
class LightningName(click.ParamType):
    """A name Lightning accepts (strategy, accelerator), from its own registry, imported only when needed."""

    def __init__(self, name: str, available: Callable[[], Iterable[str]], extra: tuple[str, ...]):
        self.name = name
        self._available, self._extra = available, extra

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text in self._extra:
            return text
        valid = sorted(set(self._available()) - set(self._extra))
        if text not in valid:
            self.fail(f"{value!r} is not a Lightning {self.name}: choose from {', '.join([*self._extra, *valid])}",
                      param, ctx)
        return text


def _fabric_strategies() -> list[str]:
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    return STRATEGY_REGISTRY.available_strategies()


def _accelerators() -> list[str]:
    from lightning.fabric.accelerators import ACCELERATOR_REGISTRY

    return ACCELERATOR_REGISTRY.available_accelerators()


def _precisions() -> list[str]:
    from typing import get_args

    from lightning.fabric.plugins.precision import precision

    return [str(p) for alias in (precision._PRECISION_INPUT_STR, precision._PRECISION_INPUT_STR_ALIAS)
            for p in get_args(alias)]


STRATEGY = LightningName("strategy", _fabric_strategies, ("auto",))
ACCELERATOR = LightningName("accelerator", _accelerators, ("auto", "gpu"))
PRECISION = LightningName("precision", _precisions, ("32-true",))


class Devices(click.ParamType):
    """Lightning's ``devices``: ``auto``, a count >= 1, ``-1`` (all), or device ids ``0,1`` (``1,`` = id 1)."""

    name = "devices"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text == "auto" or text == "-1" or (text.isdigit() and int(text) >= 1):
            return text
        ids = [part.strip() for part in text.split(",")]
        if "," in text and all(p.isdigit() for p in ids if p) and any(ids):
            return text
        self.fail(f"{value!r}: give auto, a device count >= 1, -1 (all), or device ids like 0,1", param, ctx)


DEVICES = Devices()


def lightning_devices(value: str | int) -> int | str | list[int]:
    """``--devices`` as Lightning takes it: a count, ``auto``, or a list of device ids."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return text


def check_lightning(quiet: bool = False, loggers: list | None = None, **settings: Any):
    """Build a Fabric with these settings (nothing is launched), so Lightning checks accelerator, devices,
    strategy, precision and num_nodes together; its complaint (device ids on a CPU, FSDP without a GPU, a
    missing DeepSpeed...) becomes one line. Returns the Fabric (with ``loggers``); ``quiet`` hides Lightning's notes
    for a dry check."""
    import warnings

    from lightning.fabric import Fabric

    given = ", ".join(f"--{k} {v}" for k, v in settings.items())
    if "devices" in settings:
        settings["devices"] = lightning_devices(settings["devices"])
    lightning_log = logging.getLogger("lightning.fabric")
    level = lightning_log.level
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
                lightning_log.setLevel(logging.ERROR)
            return Fabric(**settings, loggers=loggers)
    except (ValueError, TypeError, RuntimeError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"Lightning refuses {given}: {message}") from err
    finally:
        lightning_log.setLevel(level)


# ---- errors ------------------------------------------------------------------------------------------------
def run_stage(fn: Callable) -> Callable:
    """Turn a UserError into `error: ...` on stderr and exit 2; configure logging once."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


def backend_options(gpu_memory_utilization: float) -> Callable:
    """``--backend`` and the vLLM engine options, shared by stages 1 and 3."""
    decorators = [
        option("backend", type=click.Choice(["hf", "vllm", "auto"]), default="hf",
               help="auto: vllm when CUDA and vllm are available, else hf."),
        option("tensor_parallel_size", type=POSITIVE_INT, default=1, help="GPUs per vLLM engine."),
        option("gpu_memory_utilization", type=OPEN_UNIT_INTERVAL, default=gpu_memory_utilization,
               help="Share of GPU memory vLLM may take."),
        option("max_model_len", type=POSITIVE_INT, default=None, help="vLLM context length [default: the model's]."),
        option("dtype", type=click.Choice(VLLM_DTYPES), default="auto",
               help="vLLM dtype [default: the checkpoint's on GPU, float32 on CPU]."),
    ]

    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply



def task_name_help() -> str:
    """``--task_name``'s help (stages 1 and 3), from the task registry: a newly registered task appears in it."""
    from pipeline.tasks import MATH_FILE_PREFIX, SEPARATOR, TASKS

    first, second = list(TASKS)[:2]
    return (f"A task ({', '.join(TASKS)}), {MATH_FILE_PREFIX}PATH (the math task on a GSM8K/MATH-style file), "
            f"a .jsonl/.json/.parquet dataset path, or several joined with '{SEPARATOR}' "
            f"(e.g. {first}{SEPARATOR}{second}; docs/tasks.md).")


def reward_model_options(fn: Callable) -> Callable:
    """``--reward_model`` and its calibration size, for the ``hybrid`` reward (stages 1 and 3)."""
    fn = option("rm_calibration_prompts", type=POSITIVE_INT, default=16,
                help="Prompts of the warm-up pass that calibrates the hybrid reward's RM range.")(fn)
    return option("reward_model", default=None,
                  help="Sequence-classification RM for the 'hybrid' reward (HF dir or hub id).")(fn)
