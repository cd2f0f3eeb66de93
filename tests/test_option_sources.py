"""One source and one meaning per option: stages 2 and 3 take every CLI default from their arguments dataclass
(``ImportanceArgs``, ``GRPOArgs``), stage 2's network from the same defaults, ``--out_dir`` is the root of
the output tree in stage 2 as in stages 1 and 3, and stage 2's ``--batch_size`` is an old spelling of
``--per_device_train_batch_size``. Parsing and paths only: nothing trains."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import click
import pytest
import yaml

import train_grpo_softmask
import train_importance_net
from pipeline.cli import field_defaults
from pipeline.errors import UserError
from pipeline.grpo.config import GRPOArgs
from pipeline.importance import train
from pipeline.importance.config import ImportanceArgs
from pipeline.importance.model import NetConfig
from pipeline.models import load_tokenizer, model_slug
from tests.synthetic_dump import write_synthetic_dump

STAGES = {"stage2": (train_importance_net.main, ImportanceArgs), "stage3": (train_grpo_softmask.main, GRPOArgs)}


def disagreements(command: click.Command, args_class: type) -> list[str]:
    """Where a stage's CLI and its dataclass disagree: an option without a field or a field without an option,
    required on one side only, or a default (as the CLI parses it) that is not the field's."""
    params = {p.name: p for p in command.params
              if p.expose_value and not (isinstance(p, click.Option) and p.is_flag and not p.is_bool_flag)}
    fields = {f.name for f in dataclasses.fields(args_class)}
    defaults = field_defaults(args_class)
    required = [f"--{name}" for name in fields - set(defaults)]
    parsed = click.Command.make_context(command, "stage", [arg for flag in required for arg in (flag, "x")]).params
    problems = [f"--{name}: an option without a {args_class.__name__} field" for name in sorted(set(params) - fields)]
    problems += [f"{name}: a {args_class.__name__} field without an option" for name in sorted(fields - set(params))]
    for name in sorted(fields & set(params)):
        if name not in defaults:
            problems += [] if params[name].required else [f"--{name}: required in {args_class.__name__} only"]
        elif params[name].required:
            problems.append(f"--{name}: required in the CLI only")
        elif (type(parsed[name]), parsed[name]) != (type(defaults[name]), defaults[name]):
            problems.append(f"--{name}: the CLI's default {parsed[name]!r}, {args_class.__name__}'s "
                            f"{defaults[name]!r}")
    return problems


@pytest.mark.parametrize("stage", STAGES)
def test_every_cli_default_is_the_dataclass_default(stage):
    assert disagreements(*STAGES[stage]) == []


def test_a_planted_disagreement_fails():
    """The check itself: a dataclass default the CLI does not have, a CLI literal, a field without an option."""

    @dataclasses.dataclass
    class Drifted(ImportanceArgs):
        weight_decay: float = 0.0  # the value NetConfig/ImportanceModule once had of their own
        new_option: int = 1

    assert disagreements(train_importance_net.main, Drifted) == [
        "new_option: a Drifted field without an option",
        "--weight_decay: the CLI's default 0.01, Drifted's 0.0"]
    command = copy.copy(train_grpo_softmask.main)
    command.params = [copy.copy(p) for p in command.params]
    (lr,) = [p for p in command.params if p.name == "lr"]
    lr.default = 1e-5
    assert disagreements(command, GRPOArgs) == ["--lr: the CLI's default 1e-05, GRPOArgs's 1e-06"]


def test_the_network_takes_stage_2s_defaults():
    """NetConfig has no defaults of its own: a config with only a backbone is the CLI's default network."""
    args = ImportanceArgs(rollouts="unused")
    assert NetConfig(backbone="b") == NetConfig(
        backbone="b", backbone_mode=args.backbone_mode, last_k=args.last_k, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, head_hidden=args.head_hidden, form=args.f_form, pin_end=args.f_end == "pinned",
        features=args.features)


def test_stage2_batch_size_is_an_old_spelling_of_the_train_batch(capsys, tmp_path):
    main = train_importance_net.main

    def parse(*args: str) -> dict:
        return main.make_context("train_importance_net.py", ["--rollouts", "dump", *args]).params

    new = parse("--per_device_train_batch_size", "16")
    assert new["per_device_train_batch_size"] == 16 and capsys.readouterr().err == ""
    assert parse("--batch_size", "16") == new
    assert capsys.readouterr().err == ("warning: --batch_size is deprecated: use --per_device_train_batch_size "
                                       "(same meaning)\n")
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 16}))
    assert parse("--config", str(config)) == new
    assert "'batch_size' in" in capsys.readouterr().err
    assert ImportanceArgs(**new).per_device_train_batch_size == 16


@pytest.fixture(scope="module")
def tree(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(root, dump): a dump where stage 1 would put it under --out_dir root."""
    root = tmp_path_factory.mktemp("tree")
    model = str(tiny_model_dir)
    dump = write_synthetic_dump(root / "synthetic" / model_slug(model) / "rollouts_x" / "part-00000.parquet",
                                load_tokenizer(model), model, n_prompts=4)
    return root, dump.parent


def test_stage2_out_dir_is_the_root_of_the_tree(tree, tmp_path):
    root, dump = tree
    beside = dump.parent / "importance_net" / "run"
    assert train.default_run_dir(dump, "run", None) == beside  # no --out_dir: beside the dump, as before
    assert train.default_run_dir(dump, "run", root) == beside  # the tree stages 1 and 3 write under root
    elsewhere = tmp_path / "elsewhere"
    assert train.default_run_dir(dump, "run", elsewhere) == elsewhere / "synthetic" / dump.parent.name / \
        "importance_net" / "run"


def test_stage2_out_dir_needs_the_dumps_task_and_model(tree, monkeypatch):
    monkeypatch.setattr(train, "read_metadata", lambda _path: {"model_name": "m"})
    with pytest.raises(UserError, match="record no task_name, which name the run's place under --out_dir"):
        train.default_run_dir(tree[1], "run", "out")
