"""Rank plumbing on one process: each rank's share, put back together, equals the one-process result.

A rank's work depends only on its share, so the ranks are run one after the other here, each
``gather`` answering with what the others produced (tests/test_multiprocess.py runs real ranks).
"""

from __future__ import annotations

import json

import pytest

from pipeline import hybrid_reward
from pipeline.generation.base import SamplingParams
from pipeline.grpo.distributed import interleave_groups, shard
from pipeline.grpo.evaluation import evaluate
from pipeline.models import load_tokenizer
from pipeline.prompting import render_prompt
from pipeline.tasks import build_rows
from tests.stub_backend import GeometricBackend
from tests.test_hybrid_reward import reward_model_dir  # noqa: F401  (fixture)

WORLD = 3


def run_ranks(work):
    """``work(rank, gather)`` on every rank: a first pass collects each rank's share, a second gathers them."""
    shares = {}
    for rank in range(WORLD):
        work(rank, lambda obj, rank=rank: [shares.setdefault(rank, obj)])
    return [work(rank, lambda obj: [shares[r] for r in range(WORLD)]) for rank in range(WORLD)]


def test_groups_come_back_in_prompt_order():
    rows = list(range(7 * 2))  # 7 prompts x G = 2, prompt p -> rows 2p, 2p + 1
    per_rank = [[r for p in shard(range(7), rank, WORLD) for r in (2 * p, 2 * p + 1)] for rank in range(WORLD)]
    assert interleave_groups(per_rank, 2) == rows
    assert sorted(x for part in (shard(range(10), r, WORLD) for r in range(WORLD)) for x in part) == list(range(10))


@pytest.fixture(scope="module")
def eval_set(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = build_rows("arithmetic", 10, [0, 1, 2], split="eval")
    return tokenizer, rows, [render_prompt(tokenizer, row) for row in rows]


def test_sharded_evaluation_equals_one_process(eval_set):
    tokenizer, rows, prompts = eval_set
    backend = GeometricBackend(stop_prob=0.2)
    alone = evaluate(backend, tokenizer, rows, prompts, max_new_tokens=12)
    ranks = run_ranks(lambda rank, gather: evaluate(backend, tokenizer, rows, prompts, 12, rank, WORLD, gather))
    assert all(result == alone for result in ranks)
    assert sum(row["num_prompts"] for row in alone) == len(rows)


def test_calibration_runs_once_over_all_ranks(reward_model_dir, tiny_model_dir, eval_set, tmp_path,  # noqa: F811
                                              monkeypatch):
    tokenizer, rows, prompts = eval_set
    backend = GeometricBackend(stop_prob=0.2)
    questions = [row["question"] for row in rows]

    def prepare(path, rank=0, world_size=1, gather=None):
        monkeypatch.setattr(hybrid_reward, "_active", None)
        hybrid_reward.prepare_hybrid({"hybrid": 1.0}, str(reward_model_dir), path, lambda: backend, tokenizer,
                                     prompts, questions, 8, SamplingParams(max_new_tokens=6), 0, rank=rank,
                                     world_size=world_size, gather=gather)
        return hybrid_reward.active_hybrid().calibration

    alone = prepare(tmp_path / "alone.json")
    scores = []
    for rank in range(WORLD):  # what each rank scores: its own share of the warm-up completions
        prepare(tmp_path / f"share-{rank}.json", rank, WORLD, lambda obj: scores.append(obj) or [obj])
    assert sum(len(share) for share in scores) == 8, "each warm-up prompt on exactly one rank"
    shared = tmp_path / "shared.json"
    for rank in (2, 1, 0):  # now with every rank's scores gathered
        calibration = prepare(shared, rank, WORLD, lambda obj: scores)
        assert calibration["num_samples"] == 8  # scores agree up to the RM's batch padding
        assert (calibration["min"], calibration["max"]) == pytest.approx((alone["min"], alone["max"]), rel=1e-5)
        assert shared.exists() == (rank == 0), "rank 0 alone writes the file"
    assert json.loads(shared.read_text())["max"] == calibration["max"]
