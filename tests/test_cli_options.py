"""The three CLIs' options as a user spells them: help on every option, deprecated spellings that still
work (with one warning line), TRL's names for ours, stage 3's defaults, and a soft mask's declared needs.
Parsing only: each stage's ``run`` is replaced, so nothing loads or is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

import generate_paired_rollouts
import train_grpo_softmask
import train_importance_net
from pipeline import stage1
from pipeline.grpo import train
from pipeline.grpo.config import NEEDS_IMPORTANCE, GRPOArgs, validate
from pipeline.grpo.softmask import NEEDS_ENTROPY, NEEDS_F, SOFTMASKS, register_softmask

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"stage1": generate_paired_rollouts.main, "stage2": train_importance_net.main,
        "stage3": train_grpo_softmask.main}
RUNS = {"stage1": (stage1, "run"), "stage3": (train, "run")}
GENERATION_BATCH = "per_device_generation_batch_size"


@pytest.fixture
def parse(monkeypatch):
    """``parse(stage, args)`` -> (the arguments object the stage would run with, its stderr)."""

    def invoke(stage: str, args: list[str]) -> tuple[Any, str]:
        seen = []
        module, name = RUNS[stage]
        monkeypatch.setattr(module, name, seen.append)
        result = CliRunner().invoke(CLIS[stage], args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (parsed,) = seen
        return parsed, result.stderr

    return invoke


@pytest.mark.parametrize("stage", CLIS)
def test_every_option_has_help(stage):
    command = CLIS[stage]
    params = command.get_params(click.Context(command))
    missing = [param.opts[0] for param in params if not (getattr(param, "help", None) or "").strip()]
    assert not missing, f"{stage}: options without help: {missing}"


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_batch_size_is_a_deprecated_spelling_of_the_generation_batch(stage, parse, tmp_path):
    new, quiet = parse(stage, [f"--{GENERATION_BATCH}", "16"])
    assert getattr(new, GENERATION_BATCH) == 16 and quiet == ""
    warning = f"warning: --batch_size is deprecated: use --{GENERATION_BATCH} (same meaning)\n"
    assert parse(stage, ["--batch_size", "16"]) == (new, warning)
    assert parse(stage, ["--batch-size=16"]) == (new, warning.replace("--batch_size", "--batch-size"))
    config = tmp_path / "old.yaml"
    config.write_text("batch_size: 16\n")
    assert parse(stage, ["--config", str(config)]) == (
        new, f"warning: 'batch_size' in '{config}' is deprecated: use {GENERATION_BATCH} (same meaning)\n")
    (tmp_path / "new.yaml").write_text(f"{GENERATION_BATCH}: 16\n")
    assert parse(stage, ["--config", str(tmp_path / "new.yaml")]) == (new, "")


def test_a_deprecated_spelling_with_a_bad_value_is_one_error_line(tmp_path):
    result = CliRunner().invoke(train_grpo_softmask.main, ["--batch_size", "0", "--out_dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: Invalid value for '--{GENERATION_BATCH}': 0 is not in the "
                                          "range x>=1."]


@pytest.mark.parametrize("trl, ours", [
    (["--bf16"], ["--precision", "bf16-mixed"]),
    (["--fp16"], ["--precision", "16-mixed"]),
    (["--eval_steps", "5"], ["--eval_every", "5"]),
    (["--save_steps", "5"], ["--save_every", "5"]),
    (["--output_dir", "elsewhere"], ["--out_dir", "elsewhere"]),
], ids=lambda args: args[0])
def test_trl_names_parse_as_ours(trl, ours, parse):
    default, _ = parse("stage3", [])
    spelled_as_trl, quiet = parse("stage3", trl)
    assert spelled_as_trl == parse("stage3", ours)[0] != default and quiet == ""


@pytest.mark.parametrize("trl, ours", [
    ({"bf16": True}, {"precision": "bf16-mixed"}),
    ({"bf16": False}, {}),
    ({"eval_steps": 5, "save_steps": 5, "output_dir": "elsewhere"}, {"eval_every": 5, "save_every": 5,
                                                                     "out_dir": "elsewhere"}),
])
def test_trl_names_in_a_config_file(trl, ours, parse, tmp_path):
    files = []
    for name, options in (("trl", trl), ("ours", ours)):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump(options))
    assert parse("stage3", ["--config", str(files[0])]) == parse("stage3", ["--config", str(files[1])])


def test_a_switch_in_a_config_file_takes_true_or_false(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("bf16: bf16-mixed\n")
    result = CliRunner().invoke(train_grpo_softmask.main, ["--config", str(config)])
    assert result.exit_code == 2 and "'bf16' in" in result.stderr and "is a flag: give true or false" in result.stderr


def test_stage3_defaults_are_the_task_the_cpu_study_learns(parse):
    """The default model gets no reward on countdown: stage 3's defaults are the CPU study's arithmetic."""
    study = yaml.safe_load((ROOT / "studies" / "cpu_arithmetic.yaml").read_text())
    expected = (study["task_name"], tuple(study["stage3"]["levels"]), study["stage3"]["max_new_tokens"])
    parsed, _ = parse("stage3", [])
    dataclass_defaults = GRPOArgs(model_name="m")
    for args in (parsed, dataclass_defaults):
        assert (args.task_name, tuple(args.levels), args.max_new_tokens) == expected


@pytest.fixture
def mask_reading_f():
    """A soft mask registered here, declaring that it reads f; unregistered afterwards."""
    name = "test_reads_f"
    register_softmask(name, needs_f=True)(lambda mask, f, entropies, quantile: torch.ones_like(mask))
    yield name
    del SOFTMASKS[name]
    NEEDS_F.remove(name)


def test_the_registry_says_which_masks_read_f_and_entropies():
    assert NEEDS_IMPORTANCE is NEEDS_F and sorted(NEEDS_F) == ["delta", "shuffled", "variance"]
    assert sorted(NEEDS_ENTROPY) == ["entropy", "entropy_rescaled"]


def test_a_registered_mask_that_reads_f_needs_an_importance_source(mask_reading_f, tiny_model_dir, tmp_path):
    main = train_grpo_softmask.main
    assert mask_reading_f in CliRunner().invoke(main, ["--help"]).output
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), "--softmask", mask_reading_f,
                                       "--out_dir", str(tmp_path)])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: --softmask {mask_reading_f} needs --importance_net"), line
    assert not any(tmp_path.iterdir())
    validate(GRPOArgs(model_name="m", softmask=mask_reading_f, importance="online"))  # online feeds it f
