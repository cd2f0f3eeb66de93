"""Shared CLI plumbing: seed-style option names with dashed aliases, ``--config`` YAML defaults,
and one-line errors with exit code 2 for anything the user can fix."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.errors import UserError


class StageCommand(click.Command):
    """Usage errors (bad option value, unreadable --config) as one line and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()}", err=True)
            raise SystemExit(2) from err


def stage_command() -> Callable:
    return click.command(cls=StageCommand, context_settings={"help_option_names": ["-h", "--help"]})


def option(name: str, *extra: str, **kwargs: Any) -> Callable:
    """``--model_name`` and ``--model-name`` both set ``model_name``."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return click.option(*flags, *extra, name, show_default=True, **kwargs)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(f"cannot read '{value}' as YAML ({type(err).__name__}): fix the file") from err
    if not isinstance(data, dict):
        raise click.BadParameter(f"'{value}' must be a YAML mapping of option: value")
    known = {p.name for p in ctx.command.params}
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - known)
    if unknown:
        raise click.BadParameter(
            f"unknown key(s) {', '.join(unknown)} in '{value}'; valid keys: {', '.join(sorted(known - {'config'}))}"
        )
    ctx.default_map = {**(ctx.default_map or {}), **config}
    return value


def parse_levels(_ctx: click.Context | None, _param: click.Parameter | None, value: Any) -> tuple[int, ...]:
    """``--levels 0,1,2`` -> (0, 1, 2)."""
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip() != "")
    except ValueError as err:
        raise click.BadParameter("give comma-separated integers, e.g. 0,1,2,3") from err


def backend_options(gpu_memory_utilization: float) -> Callable:
    """``--backend`` and the vLLM engine options, shared by stages 1 and 3."""
    decorators = [
        option("backend", type=click.Choice(["hf", "vllm", "auto"]), default="hf",
               help="auto: vllm when CUDA and vllm are available, else hf."),
        option("tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine."),
        option("gpu_memory_utilization", type=float, default=gpu_memory_utilization,
               help="Share of GPU memory vLLM may take."),
        option("max_model_len", type=int, default=None, help="vLLM context length [default: the model's]."),
        option("dtype", default="auto", help="vLLM dtype [default: the checkpoint's on GPU, float32 on CPU]."),
    ]

    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def reward_model_options(fn: Callable) -> Callable:
    """``--reward_model`` and its calibration size, for the ``hybrid`` reward (stages 1 and 3)."""
    fn = option("rm_calibration_prompts", type=int, default=16,
                help="Prompts of the warm-up pass that calibrates the hybrid reward's RM range.")(fn)
    return option("reward_model", default=None,
                  help="Sequence-classification RM for the 'hybrid' reward (HF dir or hub id).")(fn)


def report_to_option(fn: Callable) -> Callable:
    """``--report_to tensorboard,wandb``: experiment trackers besides metrics.csv (stages 2 and 3)."""
    from pipeline.trackers import TRACKERS, parse_report_to

    def parse(_ctx: click.Context, _param: click.Parameter, value: Any) -> tuple[str, ...]:
        try:
            return parse_report_to(value)
        except UserError as err:
            raise click.BadParameter(str(err)) from err

    return option("report_to", default="csv", callback=parse,
                  help=f"Trackers, comma-separated: {', '.join(TRACKERS)} (metrics.csv is always written).")(fn)


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
    help="YAML file of option defaults (command-line flags win).",
)


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
