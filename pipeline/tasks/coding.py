"""Coding: procedurally generated small function-writing tasks, scored by hidden tests in the sandbox.

A row is one template (sum of multiples, reverse words, fizzbuzz, ...) with parameters drawn from
(seed, level, index). Levels differ in the number of hidden test cases and in how many of them are
edge cases (empty input, negatives and mixed case, large values). The expected outputs come from a
Python oracle per template and stay in the parent; the gold answer is the template's reference code.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.sandbox import probe, run_batch
from pipeline.tasks.base import ProceduralTask

CASES = {0: 3, 1: 5, 2: 8, 3: 12, 4: 16}  # hidden tests per level
EDGE_CASES = {0: 0, 1: 1, 2: 2, 3: 4, 4: 6}  # of which edge cases
EDGE_KINDS = {0: (), 1: ("empty",), 2: ("empty", "negative"), 3: ("empty", "negative", "large"),
              4: ("empty", "negative", "large")}
CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_CODE_CHARS = 20_000
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "pixel", "ocean", "maple", "quartz",
         "violet", "ember", "sun", "moss", "delta", "crane", "nova", "birch", "atlas", "fjord")
Args = list[Any]


@dataclass(frozen=True)
class Spec:
    """One drawn task: what to ask, the gold code, the oracle and the input generator."""

    signature: str
    description: str
    solution: str
    solve: Callable[..., Any]
    make_args: Callable[[random.Random, str], Args]

    @property
    def entry_point(self) -> str:
        return self.signature.split("(", 1)[0]


# ---- input generators: kind is "typical", "empty", "negative" (also messy text) or "large"

def int_list(rng: random.Random, kind: str) -> list[int]:
    if kind == "empty":
        return []
    if kind == "large":
        return [rng.randint(-10**9, 10**9) for _ in range(rng.randint(30, 60))]
    low = -30 if kind == "negative" else 0
    return [rng.randint(low, 30) for _ in range(rng.randint(3, 8))]


def text(rng: random.Random, kind: str) -> str:
    if kind == "empty":
        return ""
    words = [rng.choice(WORDS) for _ in range(rng.randint(40, 80) if kind == "large" else rng.randint(2, 5))]
    if kind == "negative":  # messy: mixed case, punctuation, runs of spaces, outer whitespace
        words = [w.upper() if rng.random() < 0.3 else w.capitalize() + rng.choice(("", "!", ",", "?")) for w in words]
        return "  " + "   ".join(words) + " "
    return " ".join(words)


def integer(rng: random.Random, kind: str, large: tuple[int, int] = (10**6, 10**12)) -> int:
    return {"empty": 0, "negative": rng.randint(-60, -1), "large": rng.randint(*large)}.get(kind, rng.randint(1, 60))


# ---- templates: each draws its parameters and returns a Spec

def sum_multiples(rng: random.Random) -> Spec:
    k = rng.randint(2, 7)
    return Spec("sum_multiples(nums: list[int]) -> int",
                f"returns the sum of the elements of nums that are divisible by {k} (0 if there are none)",
                f"def sum_multiples(nums):\n    return sum(x for x in nums if x % {k} == 0)\n",
                lambda nums: sum(x for x in nums if x % k == 0), lambda r, kind: [int_list(r, kind)])


def count_letters(rng: random.Random) -> Spec:
    letters = "".join(sorted(rng.sample("aeioulnrst", rng.randint(2, 4))))
    return Spec("count_letters(text: str) -> int",
                f"returns how many characters of text are one of the lowercase letters {', '.join(letters)} "
                "(uppercase letters do not count)",
                f"def count_letters(text):\n    return sum(c in {letters!r} for c in text)\n",
                lambda s: sum(c in letters for c in s), lambda r, kind: [text(r, kind)])


def reverse_words(rng: random.Random) -> Spec:
    sep = rng.choice((" ", "-", ",", "_", " | "))
    return Spec("reverse_words(text: str) -> str",
                f"returns the words of text (split on any run of whitespace) in reverse order, joined by {sep!r}",
                f"def reverse_words(text):\n    return {sep!r}.join(reversed(text.split()))\n",
                lambda s: sep.join(reversed(s.split())), lambda r, kind: [text(r, kind)])


def fizz_buzz(rng: random.Random) -> Spec:
    a, b = rng.sample(range(2, 8), 2)
    fizz, buzz = rng.sample(("Fizz", "Buzz", "Bang", "Pop", "Zap"), 2)

    def solve(n: int) -> list[str]:
        return [(fizz * (i % a == 0) + buzz * (i % b == 0)) or str(i) for i in range(1, n + 1)]

    return Spec("fizz_buzz(n: int) -> list[str]",
                f"returns a list with one string per number i = 1..n: {fizz!r} if i is divisible by {a}, "
                f"{buzz!r} if divisible by {b}, {fizz + buzz!r} if divisible by both, else str(i); "
                "the list is empty when n < 1",
                f"def fizz_buzz(n):\n    return [({fizz!r} * (i % {a} == 0) + {buzz!r} * (i % {b} == 0)) or str(i)\n"
                "            for i in range(1, n + 1)]\n",
                solve, lambda r, kind: [integer(r, kind, large=(60, 150))])


def running_extreme(rng: random.Random) -> Spec:
    op = rng.choice(("max", "min"))
    word = {"max": "largest", "min": "smallest"}[op]

    def solve(nums: list[int]) -> list[int]:
        out: list[int] = []
        for x in nums:
            out.append(x if not out else (max if op == "max" else min)(out[-1], x))
        return out

    return Spec(f"running_{op}(nums: list[int]) -> list[int]",
                f"returns a list whose i-th element is the {word} of nums[0], ..., nums[i] (empty for empty nums)",
                f"def running_{op}(nums):\n    out = []\n    for x in nums:\n"
                f"        out.append(x if not out else {op}(out[-1], x))\n    return out\n",
                solve, lambda r, kind: [int_list(r, kind)])


def gcd_or_lcm(rng: random.Random) -> Spec:
    if rng.random() < 0.5:
        return Spec("gcd(a: int, b: int) -> int",
                    "returns the greatest common divisor of abs(a) and abs(b), and 0 when both are 0",
                    "def gcd(a, b):\n    a, b = abs(a), abs(b)\n    while b:\n        a, b = b, a % b\n    return a\n",
                    math.gcd, lambda r, kind: [integer(r, kind), integer(r, second_kind(r, kind))])
    return Spec("lcm(a: int, b: int) -> int",
                "returns the least common multiple of abs(a) and abs(b), and 0 when either is 0",
                "def lcm(a, b):\n    a, b = abs(a), abs(b)\n    if a == 0 or b == 0:\n        return 0\n"
                "    x, y = a, b\n    while y:\n        x, y = y, x % y\n    return a * b // x\n",
                math.lcm, lambda r, kind: [integer(r, kind), integer(r, second_kind(r, kind))])


def second_kind(rng: random.Random, kind: str) -> str:
    """The second argument of a two-argument edge case: the edge again or a typical value."""
    return kind if rng.random() < 0.5 else "typical"


def shift_letters(rng: random.Random) -> Spec:
    s = rng.randint(1, 25)
    table = {chr(97 + i): chr(97 + (i + s) % 26) for i in range(26)}
    return Spec("shift_letters(text: str) -> str",
                f"returns text with every lowercase letter moved {s} places forward in the alphabet "
                "(wrapping from z to a); every other character stays as it is",
                "def shift_letters(text):\n    return ''.join(chr((ord(c) - 97 + "
                f"{s}) % 26 + 97) if 'a' <= c <= 'z' else c\n                   for c in text)\n",
                lambda t: "".join(table.get(c, c) for c in t), lambda r, kind: [text(r, kind)])


def digit_sum(rng: random.Random) -> Spec:
    base = rng.choice((10, 2, 8, 3))

    def solve(n: int) -> int:
        n, total = abs(n), 0
        while n:
            n, d = divmod(n, base)
            total += d
        return total

    return Spec("digit_sum(n: int) -> int",
                f"returns the sum of the digits of abs(n) written in base {base} (0 for n = 0)",
                f"def digit_sum(n):\n    n, total = abs(n), 0\n    while n:\n        n, d = divmod(n, {base})\n"
                "        total += d\n    return total\n",
                solve, lambda r, kind: [integer(r, kind, large=(10**12, 10**18))])


TEMPLATES: tuple[Callable[[random.Random], Spec], ...] = (
    sum_multiples, count_letters, reverse_words, fizz_buzz, running_extreme, gcd_or_lcm, shift_letters, digit_sum)


def case_kinds(level: int) -> list[str]:
    """The kinds of the hidden cases at ``level``: its edge cases first, cycling over its edge kinds."""
    kinds = EDGE_KINDS[level]
    edges = [kinds[i % len(kinds)] for i in range(EDGE_CASES[level])] if kinds else []
    return edges + ["typical"] * (CASES[level] - len(edges))


def _call(spec: Spec, args: Args) -> str:
    return f"{spec.entry_point}({', '.join(repr(a) for a in args)})"


@dataclass
class CodingTask(ProceduralTask):
    """``require_sandbox=False`` only to generate rows without scoring them (the probe refuses otherwise)."""

    require_sandbox: bool = True

    def __post_init__(self) -> None:
        if self.require_sandbox:
            probe()  # raises SandboxUnavailable: one line, and code tasks never run unconfined

    def make_row(self, level: int, index: int) -> dict[str, Any]:
        rng = random.Random(f"coding:{self.seed}:{level}:{index}")
        spec = rng.choice(TEMPLATES)(rng)
        example = spec.make_args(rng, "typical")
        tests = [{"args": args, "expected": spec.solve(*args)}
                 for args in (spec.make_args(rng, kind) for kind in case_kinds(level))]
        question = (
            f"Write a Python function `{spec.signature}` that {spec.description}.\n"
            f"Example: {_call(spec, example)} == {spec.solve(*example)!r}\n"
            f"It is checked against {len(tests)} hidden test cases. Reply with the complete function "
            "in one ```python code block.")
        return {"question": question, "answer": f"```python\n{spec.solution}```", "entry_point": spec.entry_point,
                "tests": json.dumps(tests), "reference_solution": spec.solution}


# ---- rewards (TRL signature; register in rewards.py)

def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python, ```py or bare ```), if it parses as Python."""
    blocks = CODE_BLOCK.findall(completion)
    if not blocks or len(blocks[-1]) > MAX_CODE_CHARS:
        return None
    try:
        ast.parse(blocks[-1])
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return blocks[-1]


def defines(code: str, name: str) -> bool:
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.parse(code).body)


def tests_passed(prompts, completions, entry_point=None, tests=None, **_) -> list[float]:
    """Share of the row's hidden tests that the completion's last code block passes, run in the sandbox.

    ``tests``: per row, a JSON string (or list) of ``{"args": [...], "expected": ...}``; rows without
    ``entry_point``/``tests`` (other tasks in a mixture) score 0.
    """
    scores = [0.0] * len(completions)
    jobs, rows = [], []
    for i, completion in enumerate(completions):
        code = extract_code(completion)
        if code is not None and entry_point is not None and tests is not None and entry_point[i] and tests[i]:
            jobs.append((code, entry_point[i], json.loads(tests[i]) if isinstance(tests[i], str) else tests[i]))
            rows.append(i)
    for i, result in zip(rows, run_batch(jobs) if jobs else [], strict=True):
        scores[i] = result.share
    return scores


def code_format(prompts, completions, entry_point=None, **_) -> list[float]:
    """1.0 when the last code block parses and defines the asked function (checked with ast, never run)."""
    scores = []
    for i, completion in enumerate(completions):
        code = extract_code(completion)
        scores.append(float(code is not None and entry_point is not None and defines(code, entry_point[i])))
    return scores
