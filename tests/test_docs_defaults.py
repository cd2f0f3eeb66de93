"""Every default that a docs option table quotes is the CLI parser's default.

Tables: every markdown table of README.md and docs/*.md whose header has an ``option`` (or ``options``)
column and a ``default`` column. The CLI a table documents is written out in ``TABLE_CLIS``, by
``file#section`` (the ``##`` heading above the table) or by file; a table with no entry fails, so that a
new one gets one.

Rows:

- the option cell names its options by the first word of each code span outside parentheses
  (``--lr``, ``--importance offline|online``, ``--logprob_chunk_size 512``; ``(...)`` remarks are left out);
  every one must be an option of that CLI;
- the default cell, ``(...)`` remarks left out, is split at ", " into one default per option, compared
  pairwise (``--last_k``, ``--lora_r``, ``--lora_alpha`` | ``1, 8, 16``); the counts must match;
- ``required`` means the option is required;
- skipped, because they describe a default rather than quote it: defaults with a space or a
  ``<placeholder>`` in them (``dump's `model_name` ``, ``the whole step``,
  ``<mode>-<reward column>-<group_stats>``);
- the others are compared after normalisation: backticks dropped, case ignored, numbers as floats
  (``1e-2`` == ``0.01``, ``1`` == ``"1"``), ``on``/``true``/``yes`` and ``off``/``false``/``no`` as a flag's
  True and False, ``none`` as None, a multiple option's tuple comma-joined.

And README's "What a resume may change" lists exactly the options stage 3 lets a resume change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from tests.test_docs_commands import DOCS, ROOT, cli

TABLE_CLIS = {
    "README.md#Stage 1: paired rollouts": "generate_paired_rollouts.py",
    "README.md#Stage 2: the importance network": "train_importance_net.py",
    "README.md#Stage 3: GRPO with the soft mask": "train_grpo_softmask.py",
    "README.md#Studies: does the soft mask help?": "run_study.py",
    "docs/importance.md": "train_importance_net.py",
    "docs/online_importance.md": "train_grpo_softmask.py",
    "docs/hpc.md#7. Stage 3 at 1.5B-7B on one GPU": "train_grpo_softmask.py",
}
BOOLEANS = {"true": "on", "yes": "on", "false": "off", "no": "off"}


@dataclass(frozen=True)
class Row:
    doc: str
    line: int
    section: str
    options: str
    default: str

    def where(self) -> str:
        return f"{self.doc}:{self.line} (section {self.section!r}): | {self.options} | {self.default} |"


def cells(line: str) -> list[str]:
    """A table row's cells (``\\|`` is a | inside a cell)."""
    return [cell.replace("\\|", "|").strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def option_rows(path: Path, root: Path) -> list[Row]:
    """The rows of the file's option tables (header with an option and a default column)."""
    doc = path.relative_to(root).as_posix()
    rows, section, fenced, columns = [], "", False, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.lstrip().startswith("|"):
            columns = None
            continue
        row = cells(line)
        if columns is None:  # a header
            names = [c.lower() for c in row]
            option = next((i for i, c in enumerate(names) if c in ("option", "options")), None)
            columns = (option, names.index("default")) if option is not None and "default" in names else ()
        elif columns and not set("".join(row)) <= set("-: "):
            rows.append(Row(doc, number, section, row[columns[0]], row[columns[1]]))
    return rows


def without_remarks(text: str) -> str:
    while (stripped := re.sub(r"\([^()]*\)", "", text)) != text:
        text = stripped
    return text.strip()


def normal(value: object) -> object:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).replace("`", "").strip().lower()
    text = BOOLEANS.get(text, text)
    try:
        return float(text)
    except ValueError:
        return text


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def table_cli(row: Row) -> str | None:
    return TABLE_CLIS.get(f"{row.doc}#{row.section}", TABLE_CLIS.get(row.doc))


def row_problems(row: Row) -> list[str]:
    script = table_cli(row)
    if script is None:
        return [f"no CLI for this table: add '{row.doc}#{row.section}' (or '{row.doc}') to TABLE_CLIS"]
    spans = re.findall(r"`([^`]+)`", without_remarks(row.options))
    names = [span.split()[0] for span in spans]
    if not names or not all(name.startswith("--") for name in names):
        return [f"the option cell should name options as `--option`, got {row.options!r}"]
    defaults = [d.strip() for d in without_remarks(row.default).split(", ")]
    if len(defaults) != len(names):
        return [f"{len(names)} options but {len(defaults)} defaults: give one per option, ', '-separated"]
    command = cli(script)
    ctx = click.Context(command, info_name=script)
    params = {flag: param for param in command.params for flag in param.opts}
    problems = []
    for name, default in zip(names, defaults, strict=True):
        param = params.get(name)
        if param is None:
            problems.append(f"{script} has no option {name}")
        elif default == "required":
            if not param.required:
                problems.append(f"{name} is not required in {script} (its default: {param.get_default(ctx)!r})")
        elif re.search(r"\s|<[^>]*>", default):
            continue
        elif not same(normal(default), normal(param.get_default(ctx))):
            problems.append(f"{name}: the doc says {default!r}, {script}'s default is {param.get_default(ctx)!r}")
    return problems


ROWS = [row for path in DOCS for row in option_rows(path, ROOT)]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.doc}:{r.line}" for r in ROWS])
def test_doc_default_is_the_parser_default(row):
    problems = row_problems(row)
    assert not problems, f"{row.where()}\n  " + "\n  ".join(problems)


def test_the_option_tables_are_found():
    """The extraction finds the tables it is meant to check."""
    docs = {row.doc for row in ROWS}
    assert {"docs/importance.md", "docs/online_importance.md", "docs/hpc.md"} <= docs, sorted(docs)


def test_a_drifted_default_fails(tmp_path):
    """The check itself: a wrong default, an unknown option, a row with too few defaults, an unmapped table."""
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "importance.md"
    doc.write_text("## Usage\n\n| option | default | meaning |\n|---|---|---|\n| `--lr`, `--batch_size` | 0.0005, 16 | x |\n"
                   "| `--rollouts` | required | x |\n| `--backbone` | dump's `model_name` | x |\n"
                   "| `--lr_head` | 1 | x |\n| `--last_k`, `--lora_r` | 1 | x |\n| `--resume` | off (a flag) | x |\n")
    rows = option_rows(doc, tmp_path)
    assert [r.line for r in rows] == [5, 6, 7, 8, 9, 10]
    assert [row_problems(r) for r in rows] == [
        ["--batch_size: the doc says '16', train_importance_net.py's default is 32"], [], [],
        ["train_importance_net.py has no option --lr_head"],
        ["2 options but 1 defaults: give one per option, ', '-separated"], []]
    other = tmp_path / "other.md"
    other.write_text("## A\n\n| option | default |\n|---|---|\n| `--lr` | 1 |\n")
    (row,) = option_rows(other, tmp_path)
    assert "add 'other.md#A'" in row_problems(row)[0]


def test_readme_lists_what_a_resume_may_change():
    """README's "What a resume may change" names exactly pipeline.grpo.config.RESUMABLE_ARGS."""
    from pipeline.grpo.config import RESUMABLE_ARGS

    text = (ROOT / "README.md").read_text()
    start = text.find("These may change on resume")
    assert start >= 0, "README.md lost the sentence 'These may change on resume' (update this test)"
    paragraph = re.split(r"\n\s*\n|\n- ", text[start:], maxsplit=1)[0]
    listed = set(re.findall(r"`--(\w+)`", without_remarks(paragraph)))
    assert listed == set(RESUMABLE_ARGS), (f"missing: {sorted(set(RESUMABLE_ARGS) - listed)}, "
                                           f"not resumable: {sorted(listed - set(RESUMABLE_ARGS))}")
