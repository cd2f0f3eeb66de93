"""Shared CLI plumbing for the three stages: option spellings, ``--config`` files, validated value types,
and one-line errors with exit code 2 for anything the user can fix.

Every option is declared with ``option(name, aliases=(...), type=..., ...)``: ``--model_name``,
``--model-name`` and each alias (TRL's names, e.g. ``aliases=("num_generations",)``) set the same parameter,
errors name the seed spelling, and a ``--config`` YAML file may use any of these spellings as keys.
``deprecated=(...)`` spellings (an option's old names) work too, with a one-line warning once the command
line parses. ``switch(flag, name, value)`` is a flag that sets another option's value (TRL's ``--bf16``).
Stages 2 and 3 take their defaults from their arguments dataclass (``default=DEFAULT["lr"]``, ``DEFAULT =
field_defaults(ImportanceArgs)``), as TRL's CLIs take theirs from GRPOConfig: one default per option.

Every value is checked at parse time by one of the shared types below. New options use them too, so that
bad input fails before any model loads or anything is written (tests/test_bad_input.py holds the cases):

- counts and sizes: ``POSITIVE_INT`` (>= 1), ``NON_NEGATIVE_INT`` (>= 0), ``int_at_least(n)``;
- real numbers, always finite: ``POSITIVE_FLOAT`` (> 0), ``NON_NEGATIVE_FLOAT`` (>= 0, e.g. learning rates),
  ``UNIT_INTERVAL`` [0, 1] (quantiles, strengths, ratios), ``OPEN_UNIT_INTERVAL`` (0, 1] (``top_p``, memory
  shares), ``FRACTION`` (0, 1);
- ``LEVELS`` (non-empty comma-separated levels >= 0, or a YAML list), ``DIR_NAME`` (one directory name: a
  dump's tag), ``RUN_NAME`` (a run directory, possibly a relative path), ``MAPPING`` (a YAML/JSON mapping),
  ``RegistryChoice(registry)`` (a registry's current names), and ``report_to_option`` (``--report_to``);
- Lightning's: ``DEVICES``, ``ACCELERATOR``, ``STRATEGY``, ``PRECISION``, checked against Lightning's own
  registries. ``check_lightning(accelerator=..., devices=..., strategy=..., precision=...)`` then builds the
  Fabric (nothing launched), so Lightning checks them together (device ids on a CPU, FSDP without a GPU)
  before anything is written; ``lightning_devices`` turns ``--devices`` into Lightning's value.

Checks that need several options or the files go into each stage's ``validate`` and raise ``UserError``.
"""

from __future__ import annotations

import dataclasses
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


DEPRECATED_KEYS = "deprecated_config_keys"  # ctx.meta: the --config file's deprecated keys, as warnings


class StageCommand(click.Command):
    """Usage errors (bad option value, unreadable --config) as one line and exit code 2; a deprecated
    spelling, once everything parses, as one warning line."""

    def make_context(self, info_name, args, parent=None, **extra):
        given = list(args)  # parsing consumes the list
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()}", err=True)
            raise SystemExit(2) from err
        for message in [*self._deprecated_flags(given), *ctx.meta.get(DEPRECATED_KEYS, [])]:
            click.echo(f"warning: {message}", err=True)
        return ctx

    def _deprecated_flags(self, args: list[str]) -> list[str]:
        old = {flag: param for param in self.params for flag in getattr(param, "old_flags", ())}
        used = dict.fromkeys(arg.split("=", 1)[0] for arg in args if arg.split("=", 1)[0] in old)
        return [f"{flag} is deprecated: use {old[flag].opts[0]} (same meaning)" for flag in used]


class StageOption(click.Option):
    """Names itself in errors by its seed spelling only (not every alias); ``old_spellings``: the
    deprecated ones."""

    def __init__(self, *args: Any, old_spellings: Iterable[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.old_spellings = tuple(old_spellings)
        self.old_flags = tuple(flag for spelling in self.old_spellings for flag in _flags(spelling))

    def get_error_hint(self, ctx: click.Context) -> str:
        return f"'{self.opts[0]}'"


def stage_command() -> Callable:
    return click.command(cls=StageCommand, context_settings={"help_option_names": ["-h", "--help"]})


def _flags(spelling: str) -> tuple[str, ...]:
    """``--a_b`` and ``--a-b`` (one flag when the spelling has no underscore)."""
    return tuple(dict.fromkeys((f"--{spelling}", f"--{spelling.replace('_', '-')}")))


def option(name: str, *, aliases: Iterable[str] = (), deprecated: Iterable[str] = (), **kwargs: Any) -> Callable:
    """``--model_name``, ``--model-name`` and every alias (and its dashed form) set ``model_name``;
    ``deprecated`` spellings too, with a warning (their use is named at the end of the help text)."""
    deprecated = tuple(deprecated)
    flags = list(dict.fromkeys(flag for spelling in (name, *aliases, *deprecated) for flag in _flags(spelling)))
    if deprecated:
        kwargs["help"] = f"{kwargs.get('help', '')} Deprecated spelling: {', '.join(f'--{d}' for d in deprecated)}."
    return click.option(*flags, name, cls=StageOption, show_default=True, old_spellings=deprecated, **kwargs)


def switch(flag: str, name: str, value: str, help: str) -> Callable:
    """A flag ``--flag`` that sets option ``name`` to ``value`` (TRL's boolean ``--bf16`` for ``--precision
    bf16-mixed``); in a --config file ``flag: true`` (``false`` leaves ``name`` alone)."""
    return click.option(*_flags(flag), name, cls=StageOption, flag_value=value, help=help)


def _is_switch(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and param.is_flag and not param.is_bool_flag


def option_spellings(command: click.Command) -> dict[str, click.Parameter]:
    """Every accepted config key (seed, dashed, alias and deprecated spellings) -> its parameter."""
    params: dict[str, click.Parameter] = {}
    for param in command.params:
        for flag in getattr(param, "opts", ()):
            params[flag.lstrip("-").replace("-", "_")] = param
    for param in command.params:
        params.setdefault(param.name, param)
    return params


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
    spellings = option_spellings(ctx.command)
    spellings.pop("config", None)
    config, deprecated = {}, []
    for key, setting in data.items():
        spelling = str(key).replace("-", "_")
        param = spellings.get(spelling)
        if param is None:
            raise click.BadParameter(f"unknown key '{key}' in '{value}'; valid keys: "
                                     f"{', '.join(sorted({p.name for p in spellings.values()}))}")
        if _is_switch(param):
            if not isinstance(setting, bool):
                raise click.BadParameter(f"'{key}' in '{value}' is a flag: give true or false")
            if not setting:
                continue
            setting = param.flag_value
        if param.name in config:
            raise click.BadParameter(f"'{value}' sets {param.name} twice (as '{key}' and another spelling): keep one")
        if spelling in getattr(param, "old_spellings", ()):
            deprecated.append(f"'{key}' in '{value}' is deprecated: use {param.name} (same meaning)")
        multiple = getattr(param, "multiple", False)
        config[param.name] = [setting] if multiple and isinstance(setting, str) else setting
    ctx.default_map = {**(ctx.default_map or {}), **config}
    ctx.meta[DEPRECATED_KEYS] = deprecated
    return value


def field_defaults(args_class: type) -> dict[str, Any]:
    """Each field's default by name (a fresh one from a ``default_factory``): a stage's CLI takes its defaults
    from its arguments dataclass, so every option has one default, in one place."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(args_class)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


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
BELOW_ONE = Real(min=0, max=1, max_open=True)
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


class RegistryChoice(click.Choice):
    """One of a registry's names as they are when the value is checked (and the help shown), so a name
    registered after the CLI was built (a new soft mask) is a choice too."""

    def __init__(self, registry: Mapping[str, Any]):
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(sorted(self.registry))


def report_to_option(default: tuple[str, ...]) -> Callable:
    """``--report_to tensorboard,wandb`` (comma-separated or repeated): experiment trackers besides metrics.csv
    (stages 2 and 3, ``default`` from their arguments); pipeline/trackers.py checks the names here, and their
    packages before a run starts."""
    from pipeline.trackers import TRACKERS, parse_report_to

    def parse(_ctx: click.Context, _param: click.Parameter, value: Any) -> tuple[str, ...]:
        try:
            return parse_report_to([name for item in value or () for name in str(item).split(",")])
        except UserError as err:
            raise click.BadParameter(str(err)) from err

    return option("report_to", multiple=True, default=default, callback=parse,
                  help=f"Trackers: {', '.join(TRACKERS)}; comma-separated or repeated (metrics.csv is always "
                       "written).")


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


def backend_options(gpu_memory_utilization: float, tensor_parallel: bool = True) -> Callable:
    """``--backend`` and the vLLM engine options, shared by stages 1 and 3 (``--tensor_parallel_size`` only
    with ``tensor_parallel``: stage 3 pushes the policy into one engine per training process)."""
    decorators = [
        option("backend", type=click.Choice(["hf", "vllm", "auto"]), default="hf",
               help="auto: vllm when CUDA and vllm are available, else hf."),
        *([option("tensor_parallel_size", type=POSITIVE_INT, default=1, help="GPUs per vLLM engine.")]
          if tensor_parallel else []),
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
