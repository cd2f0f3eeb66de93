"""The three stage CLIs as the study drives them: one ``--config`` file per stage run.

The study writes each run's options as the YAML that the stage's own ``--config`` reads, checks it
with the stage's own option parser before anything runs, and runs it either in this process
(``--local``) or through the stage's sbatch template (``--slurm``): the same file either way, and a
user can rerun any single run by hand with ``python <stage>.py --config <file>``.
"""

from __future__ import annotations

import gc
import importlib
import signal
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.artifacts import atomic_write
from pipeline.cli import option_spellings
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"stage1": "generate_paired_rollouts", "stage2": "train_importance_net", "stage3": "train_grpo_softmask"}
TEMPLATES = {"stage1": "slurm/stage1_rollouts.sbatch", "stage2": "slurm/stage2_importance.sbatch",
             "stage3": "slurm/stage3_grpo.sbatch"}


def command(stage: str) -> click.Command:
    if str(ROOT) not in sys.path:  # the stage CLIs are scripts at the repository root
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(SCRIPTS[stage]).main


def parse(stage: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """The values the stage would run with, given ``options`` as its --config file (any spelling its --config
    accepts); bad ones -> UserError."""
    cmd = command(stage)
    spellings = option_spellings(cmd)
    spellings.pop("config", None)
    unknown = sorted(key for key in options if str(key).replace("-", "_") not in spellings)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)} for {SCRIPTS[stage]}.py "
                        f"(see python {SCRIPTS[stage]}.py --help)")
    try:  # the base class's make_context: the stage's own one prints and exits on a usage error
        ctx = click.Command.make_context(cmd, SCRIPTS[stage], [], default_map={
            spellings[str(key).replace("-", "_")].name: value for key, value in options.items()})
    except click.UsageError as err:
        raise UserError(f"{where}: {err.format_message()}") from err
    return ctx.params


def write_config(path: Path, options: dict[str, Any]) -> Path:
    text = yaml.safe_dump(options, sort_keys=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def run_in_process(stage: str, config: Path) -> None:
    """``python <stage>.py --config <config>`` without a new interpreter (its exit 2 on bad input stays).

    Stage 3 catches SIGTERM/SIGUSR1 to checkpoint and exit: the study's own handlers come back after it.
    """
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        command(stage).main(["--config", str(config)], prog_name=f"{SCRIPTS[stage]}.py", standalone_mode=False)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    gc.collect()  # the run's models and optimizer go before the next run loads its own
