"""BlocksWorld, math (file and procedural) and task mixtures: generation, levels, rewards, stage 1."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
from click.testing import CliRunner

import rewards
from generate_paired_rollouts import main
from pipeline import samplers
from pipeline.dump import read_dump
from pipeline.errors import UserError
from pipeline.tasks import build_rows, default_rewards, get_task, task_slug
from pipeline.tasks.blocksworld import (
    LEVELS,
    apply_move,
    canonical,
    check_plan,
    random_state,
    render_plan,
    solve,
)
from pipeline.tasks.mixed import source_offset

LEVELS_ALL = [0, 1, 2, 3, 4]


def score(name: str, completions: list[str], rows: list[dict]) -> list[float]:
    """Call a registered reward the way stage 1 does: one column list per row key."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    return rewards.REWARDS[name]([""] * len(completions), completions, **columns)


def tagged(text: str) -> str:
    return f"Let me think.\n<answer>\n{text}\n</answer>"


# ---------------------------------------------------------------- blocksworld

def plain_bfs_length(initial, goal) -> int:
    """Reference solver: breadth-first search from the initial state only."""
    depth, queue = {initial: 0}, deque([initial])
    while queue:
        state = queue.popleft()
        if state == goal:
            return depth[state]
        for pile in state:
            for dest in ("table", *(other[-1] for other in state if other is not pile)):
                after = apply_move(state, (pile[-1], dest))
                if after is not None and after not in depth:
                    depth[after] = depth[state] + 1
                    queue.append(after)
    raise AssertionError("unreachable")


def test_solver_is_optimal_and_its_plan_is_legal():
    for n in (2, 3, 4, 5):
        blocks = [chr(65 + i) for i in range(n)]
        for k in range(25):
            rng = np.random.default_rng([7, n, k])
            initial, goal = random_state(rng, blocks), random_state(rng, blocks)
            plan = solve(initial, goal)
            assert len(plan) == plain_bfs_length(initial, goal)
            state = initial
            for move in plan:
                state = apply_move(state, move)
            assert state == goal


def test_blocksworld_is_deterministic_and_seeded():
    first, again = build_rows("blocksworld", 10, LEVELS_ALL), build_rows("blocksworld", 10, LEVELS_ALL)
    assert first == again
    other = build_rows("blocksworld", 10, LEVELS_ALL, data_seed=1)
    assert [r["question"] for r in other] != [r["question"] for r in first]
    assert len({r["prompt_id"] for r in first + build_rows("blocksworld", 10, LEVELS_ALL, split="eval")}) == 20


def test_blocksworld_levels_get_harder():
    task = get_task("blocksworld")
    mean_lengths = []
    for level in LEVELS_ALL:
        rows = task.rows(level, 0, 20)
        blocks, min_length = LEVELS[level]
        assert all(sum(map(len, r["initial"])) == blocks and r["optimal_length"] >= min_length for r in rows)
        mean_lengths.append(np.mean([r["optimal_length"] for r in rows]))
    assert all(a < b for a, b in zip(mean_lengths, mean_lengths[1:], strict=False)), mean_lengths


def test_gold_plan_scores_full_marks():
    rows = build_rows("blocksworld", 10, LEVELS_ALL)
    completions = [tagged(r["answer"]) for r in rows]
    for name in ("correct", "format", "valid_moves", "optimality"):
        assert score(name, completions, rows) == [1.0] * len(rows), name


def test_blocksworld_partial_rewards():
    row = get_task("blocksworld").rows(3, 0, 1)[0]
    initial, goal = canonical(row["initial"]), canonical(row["goal"])
    top = initial[0][-1]
    detour_first = (top, "table") if len(initial[0]) > 1 else (top, initial[1][-1])
    detour = [detour_first, *solve(apply_move(initial, detour_first), goal)]
    gold = row["answer"].splitlines()
    cases = {
        "longer but correct": (render_plan(detour), 1.0, 1.0, row["optimal_length"] / len(detour)),
        "stops short": ("\n".join(gold[:-1]), 0.0, 1.0, 0.0),
        "illegal second move": ("\n".join([gold[0], f"move {goal[0][0]} to {goal[0][0]}", *gold[1:]]),
                                0.0, 1 / (len(gold) + 1), 0.0),
        "numbered, loose case": ("\n".join(f"{i}. Move {m.split()[1].lower()} onto the {m.split()[3]}"
                                           for i, m in enumerate(gold, 1)), 1.0, 1.0, 1.0),
    }
    for label, (plan, correct, valid, optimal) in cases.items():
        got = [score(name, [tagged(plan)], [row])[0] for name in ("correct", "valid_moves", "optimality")]
        assert got == pytest.approx([correct, valid, optimal]), label


@pytest.mark.parametrize("completion", [
    "move A to table",  # no answer tag
    "<answer></answer>",
    "<answer>move A to A</answer>",
    "<answer>move Z to table</answer>",
    "<answer>__import__('os').system('touch /tmp/rvg_pwned')</answer>",
    "<answer>move A to table; import os</answer>",
    "<answer>" + "move A to table\n" * 500 + "</answer>",
])
def test_malformed_plans_score_zero(completion):
    row = get_task("blocksworld").rows(0, 0, 1)[0]
    assert [score(name, [completion], [row])[0] for name in ("correct", "optimality")] == [0.0, 0.0]
    assert score("valid_moves", [completion], [row])[0] <= 1 / 500


def test_plan_checker_counts_unparsable_lines_as_illegal():
    initial, goal = [["A", "B"]], [["A"], ["B"]]
    assert check_plan("move B to table", initial, goal).reaches_goal
    check = check_plan("think first\nmove B to table", initial, goal)
    assert (check.moves, check.legal_prefix, check.reaches_goal) == (2, 0, False)
    assert not check_plan("move A to table", initial, goal).reaches_goal  # A is under B


# ---------------------------------------------------------------- math

def test_bundled_math_sample_gold_answers_score_one():
    rows = build_rows("math", 100, LEVELS_ALL) + build_rows("math", 100, LEVELS_ALL, split="eval")
    assert len(rows) == 40 and {r["level"] for r in rows} == set(LEVELS_ALL)
    assert len({r["prompt_id"] for r in rows}) == 40 and len({r["question"] for r in rows}) == 40
    assert build_rows("math", 100, LEVELS_ALL) == build_rows("math", 100, LEVELS_ALL)
    assert score("correct", [tagged(r["answer"]) for r in rows], rows) == [1.0] * 40
    assert score("correct", [tagged(str(float(r["answer"]) + 1)) for r in rows], rows) == [0.0] * 40


@pytest.mark.parametrize("completion, expected", [
    ("<answer>72</answer>", 1.0),
    ("<answer>\\boxed{72}</answer>", 1.0),
    ("<answer>$72.00</answer>", 1.0),
    ("<answer>71</answer>", 0.0),
    ("so the total is 72", 1.0),  # untagged: the final answer in the text
    ("48 and then 71", 0.0),
    ("<answer>}{\\frac</answer>", 0.0),
])
def test_math_user_file_gsm8k_golds(tmp_path, completion, expected):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Natalia sold 48 clips in April and half as many in May. Total?",
                                "answer": "In May: 48/2 = <<48/2=24>>24.\nTotal: 48+24 = <<48+24=72>>72.\n#### 72"}))
    rows = build_rows(f"math:{path}", 5, [0])
    assert rows[0]["answer"] == "72" and rows[0]["task_name"] == "math" and "<answer>" in rows[0]["question"]
    assert task_slug(f"math:{path}") == "math-gsm8k"
    assert score("correct", [completion], rows) == [expected]


def test_math_user_file_boxed_golds(tmp_path):
    path = tmp_path / "competition.jsonl"
    path.write_text(json.dumps({"question": "Area?", "answer": "So the area is $\\boxed{\\frac{9}{2}}$.", "level": 2}))
    rows = build_rows(f"math:{path}", 5, [2])
    assert score("correct", ["<answer>4.5</answer>", "<answer>9/2</answer>", "<answer>5</answer>"], rows * 3) \
        == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="no train problems at levels"):
        build_rows(f"math:{path}", 5, [0])


def test_math_procedural_deterministic_harder_and_gold_scores_one():
    rows = build_rows("math_procedural", 25, LEVELS_ALL)
    assert rows == build_rows("math_procedural", 25, LEVELS_ALL)
    assert [r["question"] for r in build_rows("math_procedural", 25, LEVELS_ALL, data_seed=1)] != \
        [r["question"] for r in rows]
    steps = [np.mean([r["complexity"] for r in rows if r["level"] == level]) for level in LEVELS_ALL]
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False)), steps
    assert score("correct", [tagged(r["answer"]) for r in rows], rows) == [1.0] * len(rows)
    assert score("correct", ["<answer>-1.5</answer>"] * len(rows), rows) == [0.0] * len(rows)


# ---------------------------------------------------------------- mixtures

MIX = "countdown+arithmetic+blocksworld+math"


def test_mixture_sources_ids_and_defaults():
    rows = build_rows(MIX, 16, [0, 1, 2, 3])
    assert [r["source"] for r in rows[:4]] == ["countdown", "arithmetic", "blocksworld", "math"]
    assert all(r["source"] == r["task_name"] for r in rows)
    assert len({r["prompt_id"] for r in rows}) == 16
    assert all(set(r) == set(rows[0]) for r in rows)  # every row carries every column
    swapped = {(r["source"], r["question"]): r["prompt_id"] for r in build_rows("math+blocksworld", 8, [0, 1])}
    for r in rows:
        if (r["source"], r["question"]) in swapped:
            assert swapped[r["source"], r["question"]] == r["prompt_id"]  # stable across mixtures
    single = build_rows("blocksworld", 4, [0, 1, 2, 3])
    assert [r["prompt_id"] - source_offset("blocksworld") for r in rows if r["source"] == "blocksworld"] == \
        [r["prompt_id"] for r in single]
    assert default_rewards(MIX) == {"correct": 1.0, "format": 0.1, "valid_expression": 0.0, "uses_numbers": 0.0,
                                    "valid_moves": 0.0, "optimality": 0.0}
    with pytest.raises(UserError, match="list each task once"):
        build_rows("countdown+countdown", 4, [0])


def test_mixture_routes_correct_by_task():
    rows = build_rows(MIX, 4, [0])
    by_source = {r["source"]: r for r in rows}
    gold = {"countdown": by_source["countdown"]["reference_solution"], "arithmetic": by_source["arithmetic"]["answer"],
            "blocksworld": by_source["blocksworld"]["answer"], "math": by_source["math"]["answer"]}
    completions = [tagged(gold[r["source"]]) for r in rows]
    assert score("correct", completions, rows) == [1.0] * 4
    # the countdown target as a bare number is not an expression of the numbers
    assert score("correct", [tagged(rows[0]["answer"])] + completions[1:], rows)[0] == 0.0
    assert score("valid_moves", completions, rows) == [0.0, 0.0, 1.0, 0.0]
    assert score("uses_numbers", completions, rows) == [1.0, 0.0, 0.0, 0.0]


def test_samplers_run_on_mixture_sources():
    rows = build_rows(MIX, 40, [0, 1, 2, 3])
    sampler = samplers.build("multi_source", rows, batch_size=8, total_steps=4, seed=0)
    batch = sampler.next_batch()
    sampler.update(batch, [1.0] * len(batch))
    assert set(sampler.probabilities()) == {f"source_{s}" for s in MIX.split("+")}
    curriculum = samplers.build("time_curriculum", rows, batch_size=8, total_steps=4, complexity_source="blocksworld")
    assert len(curriculum.next_batch()) == 8


# ---------------------------------------------------------------- stage 1

@pytest.mark.parametrize("task, reward_names", [
    ("blocksworld", ["correct", "format", "valid_moves", "optimality"]),
    ("math", ["correct", "format"]),
    ("math_procedural", ["correct", "format"]),
    ("countdown+blocksworld", ["correct", "format", "valid_expression", "uses_numbers", "valid_moves", "optimality"]),
])
def test_stage1_cli_dumps_the_task_rewards(task, reward_names, tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), "--task_name", task, "--group_size", "2",
                                       "--num_prompts", "2", "--max_new_tokens", "4", "--out_dir", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob(f"{task}/tiny-llama/rollouts_*")
    frame = read_dump(path).to_pandas()
    assert len(frame) == 4 and frame["prompt_id"].nunique() == 2
    for name in reward_names:
        assert {f"reward_{name}", f"reward_{name}_group_mean", f"reward_{name}_group_var"} <= set(frame.columns)
        assert frame[f"reward_{name}"].notna().all()
