"""REWARDS: name -> reward function, the user-editable registry.

A reward function is written as for TRL's GRPOTrainer and called as TRL calls it, by keyword:
``prompts``, ``completions``, ``completion_ids``, one list per dataset column (``answer``,
``solution``, ``task_name``, ...) aligned with ``completions``, ``trainer_state`` (``.global_step``)
and ``log_extra``/``log_metric``; take what you need and ``**kwargs`` for the rest. Return one
float per completion, or None where it does not apply. ``async def`` works too. Prompts and
completions are chat messages for a dataset whose ``prompt`` is chat messages, text otherwise.

    def short(completions, **kwargs):
        return [-len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]

Add a reward by writing a function and adding it to ``REWARDS``; stage 1 dumps it as
``reward_<name>`` with group statistics, stage 3 trains on it. The built-in functions below read
text: ``REWARDS`` wraps them with ``plain_text`` so that chat messages reach them as text;
``solution_accuracy`` is written as for TRL and registered as it is.

Rows are routed by their ``task_name``, so one batch may mix tasks: ``correct`` picks the task's
checker, and a task-specific reward scores 0 on another task's rows.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.answers import (
    countdown_expression,
    evaluate_arithmetic,
    extract_tagged,
    has_one_answer_tag,
    math_equal,
)
from pipeline.hybrid_reward import active_hybrid
from pipeline.prompting import as_text
from pipeline.reward_call import CONTEXT
from pipeline.tasks.blocksworld import PlanCheck, check_plan
from pipeline.tasks.coding import code_format, tests_passed
from pipeline.tasks.credit import Spec, credit_reward, decisions_right

Row = dict[str, Any]
RowScore = Callable[[str, Row], float]


def _rows(completions: list[str], columns: dict[str, list]) -> Iterator[tuple[str, Row]]:
    """(completion, its row's columns) pairs."""
    for i, completion in enumerate(completions):
        yield completion, {key: values[i] for key, values in columns.items()}


def _countdown_parts(completion: str, row: Row) -> tuple[bool, bool, bool]:
    """(valid expression, uses exactly the given numbers, equals target)."""
    expression = countdown_expression(completion)
    evaluated = None if expression is None else evaluate_arithmetic(expression)
    if evaluated is None:
        return False, False, False
    value, literals = evaluated
    uses = Counter(literals) == Counter(int(n) for n in row["numbers"])
    return True, uses, uses and value == row["target"]


def _plan(completion: str, row: Row) -> PlanCheck:
    return check_plan(extract_tagged(completion), row["initial"], row["goal"])


def _math_correct(completion: str, row: Row) -> float:
    """The tagged answer, or without tags the final answer math-verify finds in the text (as TRL's
    accuracy rewards do): small models rarely keep the format, and ``format`` rewards it apart."""
    predicted = extract_tagged(completion)
    return float(math_equal(completion if predicted is None else predicted, str(row["answer"])))


# task_name -> checker of a final answer; tasks not listed (arithmetic, math, user files) use math-verify
CORRECT_BY_TASK: dict[str, RowScore] = {
    "countdown": lambda completion, row: float(_countdown_parts(completion, row)[2]),
    "blocksworld": lambda completion, row: float(_plan(completion, row).reaches_goal),
    "coding": lambda completion, row: float(
        tests_passed([""], [completion], entry_point=[row["entry_point"]], tests=[row["tests"]])[0] == 1.0),
    "credit": lambda completion, row: float(all(decisions_right(completion, Spec.from_answer(row["answer"])))),
}


def correct(prompts, completions, answer, **columns) -> list[float]:
    """1.0 for a right final answer, checked the way the row's task needs (math-verify by default)."""
    rows = _rows(completions, {"answer": answer, **columns})
    return [CORRECT_BY_TASK.get(row.get("task_name"), _math_correct)(c, row) for c, row in rows]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the completion gives exactly one <answer>...</answer>."""
    return [float(has_one_answer_tag(c)) for c in completions]


def for_task(task: str, score: RowScore) -> Callable[..., list[float]]:
    """A reward for one task's rows; rows of other tasks score 0 (rows without task_name count as ``task``)."""
    def reward(prompts, completions, **columns) -> list[float]:
        return [score(c, row) if row.get("task_name", task) == task else 0.0 for c, row in _rows(completions, columns)]

    reward.__doc__ = score.__doc__
    return reward


def _valid_expression(completion: str, row: Row) -> float:
    """Countdown partial credit: the answer is an arithmetic expression we can evaluate."""
    return float(_countdown_parts(completion, row)[0])


def _uses_numbers(completion: str, row: Row) -> float:
    """Countdown partial credit: the expression uses each given number exactly once."""
    return float(_countdown_parts(completion, row)[1])


def _valid_moves(completion: str, row: Row) -> float:
    """BlocksWorld partial credit: share of the plan's moves that are legal before the first illegal one."""
    check = _plan(completion, row)
    return check.legal_prefix / check.moves if check.moves else 0.0


def _optimality(completion: str, row: Row) -> float:
    """BlocksWorld: optimal plan length / plan length for a plan that reaches the goal, else 0."""
    check = _plan(completion, row)
    return row["optimal_length"] / check.moves if check.reaches_goal else 0.0


valid_expression = for_task("countdown", _valid_expression)
uses_numbers = for_task("countdown", _uses_numbers)
valid_moves = for_task("blocksworld", _valid_moves)
optimality = for_task("blocksworld", _optimality)


def credit(prompts, completions, answer, **columns) -> list[float]:
    """The credit task's reward (binary or graded, with its level's noise); other tasks' rows score 0."""
    rows = _rows(completions, {"answer": answer, **columns})
    return [credit_reward(c, row["answer"], i) if row.get("task_name", "credit") == "credit" else 0.0
            for i, (c, row) in enumerate(rows)]


def hybrid(prompts, completions, **columns) -> list[float]:
    """Verifier (``correct``) refined by the reward model the stage configured (--reward_model)."""
    verified = correct(prompts, completions, **columns)
    return active_hybrid()(verified, prompts, completions, columns.get("question"))


def solution_accuracy(completions, solution, **kwargs) -> list[float | None]:
    """Written as for TRL's GRPOTrainer, on chat completions and a ``solution`` column: 1.0 when the
    final answer (tagged or not) equals the solution under math-verify, None where a row has none."""
    contents = [completion[0]["content"] for completion in completions]
    return [None if sol is None else _math_correct(content, {"answer": sol})
            for content, sol in zip(contents, solution, strict=True)]


def plain_text(fn: Callable[..., list[float]]) -> Callable[..., list[float]]:
    """``fn`` called with text prompts and completions (chat messages as their text) and the dataset
    columns only: what the built-in rewards read."""
    @functools.wraps(fn)
    def reward(prompts, completions, **kwargs) -> list[float]:
        texts = None if prompts is None else [as_text(p) for p in prompts]
        columns = {k: v for k, v in kwargs.items() if k not in ("completion_ids", *CONTEXT)}
        return fn(texts, [as_text(c) for c in completions], **columns)

    return reward


REWARDS = {name: plain_text(fn) for name, fn in {
    "correct": correct,
    "format": format_reward,
    "valid_expression": valid_expression,
    "uses_numbers": uses_numbers,
    "valid_moves": valid_moves,
    "optimality": optimality,
    "hybrid": hybrid,
    "tests_passed": tests_passed,
    "code_format": code_format,
    "credit": credit,
}.items()} | {"solution_accuracy": solution_accuracy}
