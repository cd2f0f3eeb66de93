"""Every command line in the docs is one that the CLI it runs accepts.

From README.md and docs/*.md: every fenced block marked bash, sh, shell or console, or not marked (a
block of output has no command line in it), with backslash continuations joined, a leading ``$ ``
prompt dropped and ``;``, ``&&``, ``|`` splitting a line into its commands. A command runs a CLI when,
after environment assignments, an optional launcher (``srun``, ``torchrun``, ``sbatch`` and their own
options) and an optional ``python``/``.venv/bin/python`` (not ``python -m``), its program is one of:

- a CLI of the repo (``CLIS``): its arguments go through that CLI's own click parser;
- a stage's SLURM template (``TEMPLATES``): it passes its arguments on to the stage's CLI, so the same;
- ``slurm/pipeline.sh``: its options must be ones it knows (the ``case`` patterns of the script), and the
  strings of ``--stage1``/``--stage2``/``--stage3`` go through the stage's parser (without the required
  options, which pipeline.sh adds).

Parsing only (``Command.make_parser``, then each value through its option's type, range and callback):
no model loads and nothing runs. An unknown option, a missing value, an extra argument, a value its
type refuses or a missing required option fails with the file and line. Not converted: values with a
placeholder (``<tag>``, ``$VAR``, ``...``), paths (``click.Path``: what they may be depends on the
machine's files) and ``--config`` (its callback reads the file).
"""

from __future__ import annotations

import functools
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIS = ("generate_paired_rollouts.py", "train_importance_net.py", "train_grpo_softmask.py", "run_study.py")
TEMPLATES = {
    "slurm/stage1_rollouts.sbatch": "generate_paired_rollouts.py",
    "slurm/stage2_importance.sbatch": "train_importance_net.py",
    "slurm/stage3_grpo.sbatch": "train_grpo_softmask.py",
}
PIPELINE = "slurm/pipeline.sh"
PIPELINE_STAGES = {"--stage1": "generate_paired_rollouts.py", "--stage2": "train_importance_net.py",
                   "--stage3": "train_grpo_softmask.py"}
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}
LAUNCHERS = {"srun", "torchrun", "sbatch"}
PROGRAMS = (*CLIS, *TEMPLATES, PIPELINE)
PLACEHOLDER = re.compile(r"<[^>]*>|\$|\.\.\.")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


@functools.cache
def cli(script: str) -> click.Command:
    """The click command of a root CLI script (importing it runs nothing)."""
    return importlib.import_module(script.removesuffix(".py")).main


@dataclass(frozen=True)
class Invocation:
    doc: str
    line: int
    program: str
    args: tuple[str, ...]

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.program} {shlex.join(self.args)}"


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(number of its first line, the line) of each logical line of the file's fenced shell blocks."""
    found, fence, pending, start = [], None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence not in SHELL_BLOCKS:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        found.append((start, (pending + stripped).removeprefix("$ ")))
        pending = ""
    return found


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command of a shell line (split at ;, && and |; comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if set(word) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [words for words in commands if words]


def program(word: str) -> str | None:
    name = word.removeprefix("./")
    return name if name in PROGRAMS else None


def is_python(word: str) -> bool:
    return re.fullmatch(r"(.*/)?python3?(\.\d+)?", word) is not None


def invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(program, arguments) when the command runs one of PROGRAMS, else None."""
    while words and ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    if words and words[0] in LAUNCHERS:
        start = next((i for i, w in enumerate(words) if is_python(w) or program(w)), None)
        if start is None:
            return None
        words = words[start:]
    if words and is_python(words[0]):
        words = words[1:]
        while words and words[0].startswith("-") and words[0] != "-m":
            words = words[1:]
    if not words or program(words[0]) is None:
        return None
    return program(words[0]), words[1:]


def doc_invocations(paths: list[Path], root: Path) -> list[Invocation]:
    found = []
    for path in paths:
        doc = path.relative_to(root).as_posix()
        for number, line in shell_lines(path):
            if not any(name in line for name in PROGRAMS):
                continue
            try:
                commands = simple_commands(line)
            except ValueError as err:  # unbalanced quotes: the line cannot be what it shows
                found.append(Invocation(doc, number, f"(shell: {err})", (line,)))
                continue
            for words in commands:
                if (hit := invocation(words)) is not None:
                    found.append(Invocation(doc, number, hit[0], tuple(hit[1])))
    return found


def is_placeholder(value: object) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, str) and PLACEHOLDER.search(v) for v in values)


def parse_problems(script: str, args: list[str], partial: bool = False) -> list[str]:
    """What the CLI's parser refuses in ``args`` (``partial``: required options may be missing)."""
    command = cli(script)
    ctx = click.Context(command, info_name=script)
    try:
        values, extra, order = command.make_parser(ctx).parse_args(list(args))
    except click.UsageError as err:
        return [err.format_message()]
    problems = [f"unexpected argument {arg!r}" for arg in extra]
    for param in dict.fromkeys(order):
        value = values[param.name]
        if param.name == "config" or isinstance(param.type, click.Path) or is_placeholder(value):
            continue
        try:
            param.process_value(ctx, value)
        except click.UsageError as err:
            problems.append(err.format_message())
    if not partial and "config" not in values:
        problems += [f"missing required option {p.opts[0]}" for p in command.params
                     if p.required and p.name not in values]
    return problems


@functools.cache
def pipeline_options() -> dict[str, bool]:
    """slurm/pipeline.sh's options (from its ``case`` patterns) -> whether each takes a value."""
    text = (ROOT / PIPELINE).read_text()
    patterns = re.findall(r"^\s+(-[\w|-]+)\)", text, re.M)
    return {flag: flag not in ("-h", "--help") for pattern in patterns for flag in pattern.split("|")}


def problems_of(inv: Invocation) -> list[str]:
    if inv.program.startswith("(shell"):
        return [inv.program]
    if inv.program != PIPELINE:
        return parse_problems(TEMPLATES.get(inv.program, inv.program), list(inv.args))
    problems, args, known = [], list(inv.args), pipeline_options()
    while args:
        flag = args.pop(0)
        if flag not in known:
            problems.append(f"{PIPELINE} has no option {flag!r}")
            continue
        if known[flag]:
            if not args:
                problems.append(f"{flag} needs a value")
                break
            value = args.pop(0)
            if flag in PIPELINE_STAGES:
                problems += [f"{flag}: {p}" for p in
                             parse_problems(PIPELINE_STAGES[flag], shlex.split(value), partial=True)]
    return problems


INVOCATIONS = doc_invocations(DOCS, ROOT)


@pytest.mark.parametrize("inv", INVOCATIONS, ids=[f"{i.doc}:{i.line}" for i in INVOCATIONS])
def test_doc_command_parses(inv):
    problems = problems_of(inv)
    assert not problems, f"{inv.where()}\n  " + "\n  ".join(problems)


def test_the_docs_show_every_cli():
    """The extraction finds something: each CLI and template has at least one command in the docs."""
    shown = {inv.program for inv in INVOCATIONS}
    assert set(CLIS) | set(TEMPLATES) | {PIPELINE} <= shown, sorted(shown)


def test_a_drifted_option_fails(tmp_path):
    """The check itself: an unknown option, a refused value and a missing required option are found."""
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\n.venv/bin/python train_importance_net.py --rollouts <dump> \\\n    --lr_head 1\n"
                   "python generate_paired_rollouts.py --group_size 1; train_importance_net.py --lr 1e-2\n"
                   "slurm/pipeline.sh --shards 2 --stage3 \"--softmask nope\"\n```\n")
    found = doc_invocations([doc], tmp_path)
    assert [(i.line, i.program) for i in found] == [(2, "train_importance_net.py"), (4, "generate_paired_rollouts.py"),
                                                  (4, "train_importance_net.py"), (5, PIPELINE)]
    problems = [problems_of(inv) for inv in found]
    assert "No such option '--lr_head'" in problems[0][0]
    assert "--group_size" in problems[1][0] and "1" in problems[1][0]
    assert problems[2] == ["missing required option --rollouts"]
    assert "--stage3" in problems[3][0] and "nope" in problems[3][0]


@pytest.mark.parametrize("script", ["generate_paired_rollouts.py", "train_grpo_softmask.py"])
def test_task_name_help_lists_the_registry(script):
    """``--task_name --help`` is built from pipeline.tasks.TASKS: a newly registered task shows up."""
    from pipeline.tasks import MATH_FILE_PREFIX, SEPARATOR, TASKS

    (param,) = [p for p in cli(script).params if p.name == "task_name"]
    for name in [*TASKS, f"{MATH_FILE_PREFIX}PATH", ".jsonl", ".parquet", f"'{SEPARATOR}'"]:
        assert name in param.help, (name, param.help)
