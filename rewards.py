"""REWARDS: name -> reward function, the user-editable registry.

Each function has TRL's reward signature: ``fn(prompts, completions, **columns) -> list[float]``,
where ``columns`` holds one list per dataset column (``answer``, ``task_name``, ``numbers``,
``target``, ...), aligned with ``completions``. Add a reward by writing a function and adding it
to ``REWARDS``; stage 1 dumps it as ``reward_<name>`` with group statistics, stage 3 trains on it.
"""

from __future__ import annotations

from collections import Counter

from pipeline.answers import (
    countdown_expression,
    evaluate_arithmetic,
    extract_tagged,
    has_one_answer_tag,
    math_equal,
)


def _countdown_parts(completion: str, numbers: list[int], target: int) -> tuple[bool, bool, bool]:
    """(valid expression, uses exactly the given numbers, equals target)."""
    expression = countdown_expression(completion)
    evaluated = None if expression is None else evaluate_arithmetic(expression)
    if evaluated is None:
        return False, False, False
    value, literals = evaluated
    uses = Counter(literals) == Counter(int(n) for n in numbers)
    return True, uses, uses and value == target


def correct(prompts, completions, answer, task_name=None, numbers=None, target=None, **_) -> list[float]:
    """1.0 for a right final answer: countdown checks the expression, other tasks use math-verify."""
    scores = []
    for i, completion in enumerate(completions):
        if task_name is not None and task_name[i] == "countdown":
            scores.append(float(_countdown_parts(completion, numbers[i], target[i])[2]))
        else:
            predicted = extract_tagged(completion)
            scores.append(float(predicted is not None and math_equal(predicted, answer[i])))
    return scores


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the completion gives exactly one <answer>...</answer>."""
    return [float(has_one_answer_tag(c)) for c in completions]


def valid_expression(prompts, completions, numbers, target, **_) -> list[float]:
    """Countdown partial credit: the answer is an arithmetic expression we can evaluate."""
    return [float(_countdown_parts(c, n, t)[0]) for c, n, t in zip(completions, numbers, target, strict=True)]


def uses_numbers(prompts, completions, numbers, target, **_) -> list[float]:
    """Countdown partial credit: the expression uses each given number exactly once."""
    return [float(_countdown_parts(c, n, t)[1]) for c, n, t in zip(completions, numbers, target, strict=True)]


REWARDS = {
    "correct": correct,
    "format": format_reward,
    "valid_expression": valid_expression,
    "uses_numbers": uses_numbers,
}
