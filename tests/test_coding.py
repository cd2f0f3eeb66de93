"""The coding task: deterministic rows, levels that grow harder, and rewards for right, wrong and
malformed answers (the scoring ones run in the sandbox and are skipped where it is unavailable)."""

from __future__ import annotations

import json

import pytest

from pipeline.sandbox import SandboxUnavailable, grading, probe
from pipeline.sandbox.execute import Run
from pipeline.tasks import coding
from pipeline.tasks.base import HELDOUT_LEVEL, TRAIN_LEVELS
from pipeline.tasks.coding import CASES, TEMPLATES, CodingTask, case_kinds, code_format, extract_code

LEVELS = (*TRAIN_LEVELS, HELDOUT_LEVEL)
EMPTY_INPUTS = ([], "", 0)


def task(seed: int = 0) -> CodingTask:
    return CodingTask(name="coding", default_rewards={"tests_passed": 1.0}, seed=seed, require_sandbox=False)


@pytest.fixture(scope="module")
def sandbox():
    try:
        return probe()
    except SandboxUnavailable as err:
        pytest.skip(str(err))


def scores(row: dict, completions: list[str]) -> list[float]:
    n = len(completions)
    return coding.tests_passed([row["question"]] * n, completions, entry_point=[row["entry_point"]] * n,
                        tests=[row["tests"]] * n, answer=[row["answer"]] * n, task_name=["coding"] * n)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nDone."


def test_rows_are_deterministic_per_seed():
    assert task(0).rows(2, 0, 10) == task(0).rows(2, 0, 10)
    assert task(0).rows(2, 0, 10) != task(1).rows(2, 0, 10)
    assert task(0).rows(2, 0, 10) != task(0).rows(3, 0, 10)


def test_levels_get_harder():
    counts = [CASES[level] for level in LEVELS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    edges = [sum(kind != "typical" for kind in case_kinds(level)) for level in LEVELS]
    assert edges == sorted(edges) and edges[0] == 0 and edges[-1] > edges[1]
    for level in LEVELS:
        for row in task().rows(level, 0, 12):
            tests = json.loads(row["tests"])
            assert len(tests) == CASES[level] and f"{len(tests)} hidden test cases" in row["question"]
            assert all(set(t) == {"args", "expected"} for t in tests)
            if level >= 1:  # every row from level 1 on has an empty-input case
                assert any(arg in EMPTY_INPUTS for t in tests for arg in t["args"])


def test_every_template_is_drawn_and_rows_carry_the_columns():
    rows = [row for level in LEVELS for row in task().rows(level, 0, 40)]
    names = {row["entry_point"] for row in rows}
    assert names >= {"sum_multiples", "count_letters", "reverse_words", "fizz_buzz", "shift_letters", "digit_sum"}
    assert names & {"running_max", "running_min"} and names & {"gcd", "lcm"} and len(TEMPLATES) == 8
    for row in rows:
        assert {"question", "answer", "entry_point", "tests", "reference_solution"} <= set(row)
        assert row["answer"] == f"```python\n{row['reference_solution']}```"


def test_extract_code_takes_the_last_block_that_parses():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("def f(x): return x") is None
    assert extract_code("```python\ndef f(:\n```") is None
    assert extract_code("```python\n" + "x = 1\n" * 5000 + "```") is None


def test_code_format_checks_the_function_without_running_it():
    cols = {"entry_point": ["f", "f", "f"]}
    completions = [fenced("def f(x):\n    return x\n"), fenced("def g(x):\n    return x\n"), "def f(x): return x"]
    assert code_format(["q"] * 3, completions, **cols) == [1.0, 0.0, 0.0]


def test_expected_outputs_never_enter_the_sandbox(monkeypatch, sandbox):
    seen = []

    def fake_execute(mode, limits, code, entry_point, inputs, timeout_s, cgroups=None):
        seen.append(json.dumps([code, entry_point, inputs]))
        return Run(records=[None] * len(inputs))

    monkeypatch.setattr(grading, "execute", fake_execute)
    row = task().rows(3, 0, 1)[0]
    scores(row, [row["answer"]])
    secret_outputs = [json.dumps(t["expected"]) for t in json.loads(row["tests"]) if t["expected"] not in EMPTY_INPUTS]
    assert seen and not any(out in seen[0] for out in secret_outputs if len(out) > 3)


def test_gold_answers_score_one_at_every_level(sandbox):
    rows = [row for level in LEVELS for row in task(seed=3).rows(level, 0, 6)]
    n = len(rows)
    got = coding.tests_passed(["q"] * n, [row["answer"] for row in rows], entry_point=[row["entry_point"] for row in rows],
                       tests=[row["tests"] for row in rows])
    assert got == [1.0] * n


def test_correct_incorrect_and_malformed_answers(sandbox):
    row = next(r for r in task().rows(2, 0, 50) if r["entry_point"] == "reverse_words")
    sep = row["reference_solution"].split(".join")[0].split("return ")[1]
    correct = fenced(f"def reverse_words(text):\n    words = text.split()\n    words.reverse()\n    return {sep}.join(words)\n")
    incorrect = fenced(f"def reverse_words(text):\n    return {sep}.join(text.split(' ')[::-1])\n")  # messy spacing
    malformed = [
        "The words reversed are: world hello",
        fenced("def reverse_words(text:\n    return text\n"),
        fenced("def reverse(text):\n    return text\n"),
        fenced("import sys\nsys.exit(0)\n"),
    ]
    got = scores(row, [correct, incorrect, *malformed])
    assert got[0] == 1.0
    assert 0.0 < got[1] < 1.0
    assert got[2:] == [0.0] * len(malformed)


def test_rows_without_tests_score_zero():
    assert coding.tests_passed(["q"], [fenced("def f():\n    return 1\n")], entry_point=[None], tests=[None]) == [0.0]
