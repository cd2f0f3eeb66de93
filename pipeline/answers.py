"""Reading answers out of model text. Model output is hostile: nothing here evals or execs it."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from math_verify import parse, verify

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
MAX_EXPRESSION_CHARS = 200
MAX_LITERAL = 10**6
BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def extract_tagged(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, or None."""
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def has_one_answer_tag(text: str) -> bool:
    return len(ANSWER_TAG.findall(text)) == 1


def math_equal(predicted: str, gold: str) -> bool:
    """math-verify equivalence (numbers, fractions, LaTeX, boxed answers); False on any parse failure."""
    try:
        gold_parsed = parse(gold)
        pred_parsed = parse(predicted)
        return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))
    except Exception:  # noqa: BLE001 - a checker failure on hostile text is a wrong answer
        return False


def _walk(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _walk(node.left, literals), _walk(node.right, literals)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_LITERAL:
        literals.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def evaluate_arithmetic(expression: str) -> tuple[Fraction, list[int]] | None:
    """Value and integer literals of an expression over + - * / and parentheses, else None.

    The tree is walked by hand (``ast.parse`` only builds it), so calls, names, attributes,
    powers and anything else are rejected before any value is computed.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        literals: list[int] = []
        return _walk(tree.body, literals), literals
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def countdown_expression(text: str) -> str | None:
    """The expression a countdown answer gives: tagged content, left of any '='."""
    tagged = extract_tagged(text)
    return None if tagged is None else tagged.split("=")[0].strip()
