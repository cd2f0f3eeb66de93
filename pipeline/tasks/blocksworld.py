"""BlocksWorld: restack lettered blocks into a goal configuration, one legal move at a time.

reasoning-gym has no blocksworld generator, so instances are drawn here, deterministically from
(seed, level, index), and solved by breadth-first search: every instance is solvable and carries
its optimal plan length. Plans are parsed line by line with a regex (model output is never run).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.tasks.base import ProceduralTask

State = tuple[tuple[str, ...], ...]  # piles, each bottom to top, in a canonical (sorted) order
Move = tuple[str, str]  # (block, destination block or "table")
TABLE = "table"
# level -> (number of blocks, smallest optimal plan length accepted)
LEVELS = {0: (3, 2), 1: (4, 3), 2: (5, 4), 3: (6, 5), 4: (7, 6)}
MOVE_LINE = re.compile(r"(?:\d+[.)]|[-*])?\s*move\s+([a-z])\s+(?:on)?to\s+(?:the\s+)?([a-z]|table)\s*\.?",
                       re.IGNORECASE)


def canonical(piles: Sequence[Sequence[str]]) -> State:
    return tuple(sorted(tuple(p) for p in piles if p))


def apply_move(state: State, move: Move) -> State | None:
    """The state after ``move``, or None when the move is illegal.

    Legal: the block is clear (top of its pile) and goes onto another clear block, or onto the
    table from on top of another block.
    """
    block, dest = move
    source = next((i for i, pile in enumerate(state) if pile[-1] == block), None)
    if source is None or block == dest:
        return None
    piles = [list(p) for p in state]
    piles[source].pop()
    if dest == TABLE:
        if not piles[source]:
            return None
        piles.append([block])
    else:
        target = next((i for i, pile in enumerate(piles) if pile and pile[-1] == dest), None)
        if target is None:
            return None
        piles[target].append(block)
    return canonical(piles)


def _neighbours(state: State) -> Iterator[tuple[Move, State]]:
    for pile in state:
        for dest in (TABLE, *(other[-1] for other in state if other is not pile)):
            after = apply_move(state, (pile[-1], dest))
            if after is not None:
                yield (pile[-1], dest), after


def _inverse(move: Move, before: State) -> Move:
    """The move that undoes ``move`` made from ``before`` (every move is reversible)."""
    pile = next(p for p in before if p[-1] == move[0])
    return move[0], pile[-2] if len(pile) > 1 else TABLE


def solve(initial: State, goal: State) -> list[Move]:
    """A shortest plan, by bidirectional breadth-first search (moves are reversible).

    Plain BFS needs seconds on 7 blocks; this needs milliseconds. Layers are grown from the
    smaller side; at the start of a layer no state lies in both trees, so the first state that
    does sits at the other tree's current depth, and the path through it is a shortest one.
    """
    if initial == goal:
        return []
    # per side: state -> (parent, move from parent to state); side 0 grows from initial, 1 from goal
    trees: list[dict[State, tuple[State, Move] | None]] = [{initial: None}, {goal: None}]
    frontiers = [[initial], [goal]]
    while True:
        side = 0 if len(frontiers[0]) <= len(frontiers[1]) else 1
        layer = []
        for state in frontiers[side]:
            for move, after in _neighbours(state):
                if after in trees[side]:
                    continue
                trees[side][after] = (state, move)
                if after in trees[1 - side]:
                    return _join(trees, after)
                layer.append(after)
        frontiers[side] = layer


def _join(trees: list[dict[State, tuple[State, Move] | None]], middle: State) -> list[Move]:
    """initial -> middle along the first tree, then middle -> goal undoing the second tree's moves."""
    def steps_to_root(tree: dict[State, tuple[State, Move] | None]) -> list[tuple[State, Move]]:
        steps, state = [], middle
        while tree[state] is not None:
            parent, move = tree[state]
            steps.append((parent, move))
            state = parent
        return steps

    forward = [move for _, move in reversed(steps_to_root(trees[0]))]
    return forward + [_inverse(move, parent) for parent, move in steps_to_root(trees[1])]


def random_state(rng: np.random.Generator, blocks: Sequence[str]) -> State:
    """Blocks dropped in random order, each on the table or on a random pile."""
    piles: list[list[str]] = []
    for block in rng.permutation(list(blocks)):
        slot = int(rng.integers(len(piles) + 1))
        if slot == len(piles):
            piles.append([str(block)])
        else:
            piles[slot].append(str(block))
    return canonical(piles)


def parse_plan(text: str) -> list[Move | None]:
    """One entry per non-empty line: the move it states, or None for a line that is not a move."""
    moves: list[Move | None] = []
    lines = (raw.strip() for raw in text.splitlines())
    for line in filter(None, lines):
        found = MOVE_LINE.fullmatch(line)
        moves.append(None if found is None else (found[1].upper(),
                                                 TABLE if found[2].lower() == TABLE else found[2].upper()))
    return moves


@dataclass(frozen=True)
class PlanCheck:
    moves: int  # lines in the plan
    legal_prefix: int  # legal moves before the first illegal or unparsable line
    reaches_goal: bool  # every move legal and the final state is the goal


def check_plan(plan_text: str | None, initial: Sequence[Sequence[str]], goal: Sequence[Sequence[str]]) -> PlanCheck:
    """Simulate the plan from ``initial``; an unparsable line counts as an illegal move."""
    moves = parse_plan(plan_text or "")
    state: State | None = canonical(initial)
    legal = 0
    for move in moves:
        state = None if move is None else apply_move(state, move)
        if state is None:
            break
        legal += 1
    done = bool(moves) and legal == len(moves) and state == canonical(goal)
    return PlanCheck(len(moves), legal, done)


def render_plan(moves: Sequence[Move]) -> str:
    return "\n".join(f"move {block} to {dest}" for block, dest in moves)


def _describe(state: State) -> str:
    return "\n".join(f"- pile {i}: {' '.join(pile)}" for i, pile in enumerate(state, 1))


@dataclass
class BlocksWorldTask(ProceduralTask):
    """Levels add blocks and raise the shortest plan's minimum length (3 blocks/2 moves .. 7/6)."""

    def instance(self, level: int, index: int) -> tuple[State, State, list[Move]]:
        n_blocks, min_length = LEVELS[level]
        blocks = [chr(ord("A") + i) for i in range(n_blocks)]
        rng = np.random.default_rng([self.seed, level, index])
        while True:
            initial, goal = random_state(rng, blocks), random_state(rng, blocks)
            plan = solve(initial, goal)
            if len(plan) >= min_length:
                return initial, goal, plan

    def make_row(self, level: int, index: int) -> dict[str, Any]:
        initial, goal, plan = self.instance(level, index)
        question = (
            "Blocks world. Each pile is listed from the bottom block (on the table) to the top block.\n"
            f"Initial state:\n{_describe(initial)}\nGoal state:\n{_describe(goal)}\n"
            "You may move only a block with nothing on it, onto the table or onto another block with "
            "nothing on it. Give the plan that reaches the goal state in as few moves as possible inside "
            "<answer></answer>, one move per line, each exactly 'move X to Y' where Y is a block or "
            "table, for example <answer>\nmove B to table\nmove A to C\n</answer>."
        )
        return {"question": question, "answer": render_plan(plan), "initial": [list(p) for p in initial],
                "goal": [list(p) for p in goal], "optimal_length": len(plan), "complexity": float(len(plan))}
