"""A TRL user's reward functions and datasets, unchanged: calling conventions, None rows, failures,
and real numbers through the stage-1 and stage-3 CLIs on the tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from trl.rewards import accuracy_reward, get_soft_overlong_punishment
from trl.trainer.utils import nanstd

import generate_paired_rollouts
import rewards
import train_grpo_softmask
from pipeline import scoring
from pipeline.dump import read_dump
from pipeline.errors import UserError
from pipeline.tasks import build_rows

QUESTIONS = ["Calculate 12 + 7.", "What is 3 * 4?", "Simplify 2/6.", "Prove it."]
SOLUTIONS = ["19", "12", r"\frac{1}{3}", "see the proof"]  # the last one math-verify cannot parse


# ---- reward functions in the style of TRL's documentation ------------------------------------------

def reward_len(completions, **kwargs):
    """TRL docs: favour completions close to 20 characters (conversational)."""
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


def reward_len_text(completions, **kwargs):
    """The same for a dataset of text prompts (TRL's standard format)."""
    return [-abs(20 - len(completion)) for completion in completions]


def num_tokens(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def solution_length(completions, solution, **kwargs):
    return [float(len(s)) for s in solution]


def none_on_odd_start(completion_ids, **kwargs):
    """None (does not apply) where the first sampled token id is odd."""
    return [None if ids[0] % 2 else 1.0 for ids in completion_ids]


async def async_chars(completions, trainer_state, log_metric, log_extra, **kwargs):
    await asyncio.sleep(0)
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    log_metric("global_step_seen", trainer_state.global_step)
    log_extra("chars", [len(t) for t in texts])
    return [len(t) / 100 for t in texts]


TRL_STYLE = {"reward_len": reward_len, "num_tokens": num_tokens, "solution_length": solution_length,
             "accuracy": accuracy_reward, "none_on_odd_start": none_on_odd_start, "async_chars": async_chars,
             "overlong": get_soft_overlong_punishment(max_completion_len=12, soft_punish_cache=6)}


@pytest.fixture
def trl_rewards(monkeypatch):
    for name, fn in {**TRL_STYLE, "reward_len_text": reward_len_text}.items():
        monkeypatch.setitem(rewards.REWARDS, name, fn)


def write_dataset(path, layout: str, with_solution: bool = True):
    rows = []
    for q, s in zip(QUESTIONS, SOLUTIONS, strict=True):
        row = {"prompt": [{"role": "user", "content": q}] if layout == "conversational" else f"Q: {q}\nA:"}
        rows.append(row | ({"solution": s} if with_solution else {}))
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def score_rows(weights, rows, completions, completion_ids=None, **kwargs):
    ids = completion_ids or [[1, 2, 3]] * len(completions)
    return scoring.score(weights, rows, ["rendered"] * len(rows), completions, ids, **kwargs)


# ---- the None/NaN rule, against TRL's code -----------------------------------------------------------

def test_total_is_trls_weighted_nansum_with_unscorable_rows_nan():
    gen = torch.Generator().manual_seed(0)
    per_func = torch.rand(12, 3, generator=gen)
    per_func[torch.rand(12, 3, generator=gen) < 0.4] = torch.nan
    per_func[[2, 7]] = torch.nan  # every function gave None
    weights = torch.tensor([1.0, 0.5, 2.0])
    # TRL 1.16 _generate_and_score_completions, verbatim
    unscorable_mask = torch.isnan(per_func).all(dim=1)
    expected = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    expected[unscorable_mask] = torch.nan
    ours = scoring.weighted_total({f"f{i}": per_func[:, i].double().numpy() for i in range(3)},
                                  {f"f{i}": float(w) for i, w in enumerate(weights)})
    np.testing.assert_allclose(ours, expected.double().numpy(), rtol=1e-6)
    assert np.isnan(ours).tolist() == unscorable_mask.tolist()
    assert np.nanmean(ours) == pytest.approx(torch.nanmean(expected).item(), rel=1e-6)  # TRL's logged "reward"
    assert np.nanstd(ours, ddof=1) == pytest.approx(nanstd(expected).item(), rel=1e-5)  # TRL's "reward_std"


def test_none_rows_and_conversational_inputs_as_trl_passes_them():
    rows = [{"prompt": [{"role": "user", "content": q}], "solution": s} for q, s in zip(QUESTIONS, SOLUTIONS,
                                                                                      strict=True)]
    completions = [r"It is \boxed{19}", r"\boxed{13}", r"My answer is \boxed{\frac{1}{3}}", "done"]
    seen = {}

    def spy(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, solution=solution,
                    step=trainer_state.global_step, keys=set(kwargs))
        return [0.0] * len(completions)

    scoring_registry = {"accuracy": accuracy_reward, "spy": spy}
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in scoring_registry.items():
            mp.setitem(rewards.REWARDS, name, fn)
        batch = score_rows({"accuracy": 1.0, "spy": 0.0}, rows, completions, [[5], [6, 7], [8], [9]],
                           state=scoring.TrainerState(global_step=3, max_steps=10))
    np.testing.assert_array_equal(batch.per_function["accuracy"][:3], [1.0, 0.0, 1.0])
    assert math.isnan(batch.per_function["accuracy"][3])  # unparseable gold: TRL's accuracy_reward says None
    assert batch.total.tolist()[:3] == [1.0, 0.0, 1.0] and batch.total[3] == 0.0  # spy's 0 still counts
    assert seen["prompts"] == [row["prompt"] for row in rows]
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in completions]
    assert seen["ids"] == [[5], [6, 7], [8], [9]] and seen["solution"] == SOLUTIONS and seen["step"] == 3
    assert {"log_extra", "log_metric"} <= seen["keys"] and "prompt" not in seen["keys"]
    assert batch.extra["gold_parsed"][3] == "[unparseable]" and batch.extra["solution"] == SOLUTIONS


def test_builtin_rewards_read_chat_completions_as_text():
    rows = [{"prompt": [{"role": "user", "content": "12 + 7?"}], "answer": "19", "task_name": "mine"}] * 2
    batch = score_rows({"correct": 1.0, "format": 0.5}, rows, ["<answer>19</answer>", "<answer>18</answer>"])
    assert batch.total.tolist() == [1.5, 0.5]


def test_async_functions_run_concurrently(monkeypatch):
    """Each waits for the other: run one after the other, they would time out."""
    ready = {}

    async def waits_for(other: str, me: str):
        ready.setdefault(me, asyncio.Event()).set()
        await asyncio.wait_for(ready.setdefault(other, asyncio.Event()).wait(), timeout=5)
        return 1.0

    async def first(completions, **kwargs):
        return [await waits_for("second", "first") for _ in completions]

    async def second(completions, **kwargs):
        return [await waits_for("first", "second") for _ in completions]

    monkeypatch.setitem(rewards.REWARDS, "first", first)
    monkeypatch.setitem(rewards.REWARDS, "second", second)
    batch = score_rows({"first": 1.0, "second": 1.0}, [{"answer": "1"}] * 2, ["a", "b"])
    assert batch.total.tolist() == [2.0, 2.0] and not batch.failures


def test_function_without_kwargs_gets_what_it_names(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "strict", lambda completions, answer: [float(a == c) for a, c in
                                                                                zip(answer, completions, strict=True)])
    batch = score_rows({"strict": 1.0}, [{"answer": "x"}, {"answer": "y"}], ["x", "x"])
    assert batch.total.tolist() == [1.0, 0.0]


# ---- failures ----------------------------------------------------------------------------------------

def test_a_function_failing_on_every_row_stops_with_one_line(monkeypatch):
    def broken(completions, **kwargs):
        raise RuntimeError("model server down\nretry later")

    monkeypatch.setitem(rewards.REWARDS, "broken", broken)
    with pytest.raises(UserError) as err:
        score_rows({"format": 1.0, "broken": 1.0}, [{"answer": "1"}] * 3, ["a", "b", "c"])
    assert str(err.value) == "reward 'broken' failed on every completion of the batch: RuntimeError: model server down"


def test_a_column_read_through_kwargs_that_the_dataset_lacks_is_named(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "needs_solution",
                        lambda completions, **kwargs: [float(s in c) for s, c in zip(kwargs["solution"], completions,
                                                                                     strict=True)])
    with pytest.raises(UserError, match=r"reward 'needs_solution' failed on every completion of the batch: "
                                        r"KeyError: 'solution' \(the dataset has no column 'solution'\)"):
        score_rows({"needs_solution": 1.0}, [{"answer": "1"}] * 2, ["a", "b"])


def test_a_required_column_the_dataset_lacks_is_refused_before_any_work(trl_rewards):
    with pytest.raises(UserError, match=r"reward 'solution_length' needs column\(s\) solution, which the dataset "
                                        r"lacks \(it has answer\): add them or choose other --rewards"):
        scoring.check_reward_arguments(["reward_len", "solution_length"], {"prompt": [], "answer": "1"})
    scoring.check_reward_arguments(["solution_length", "accuracy", "num_tokens", "overlong"], ["solution"])


def test_occasional_failures_are_counted_and_the_rest_scored(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "flaky", lambda completions, **kw: [1 / len(c) for c in completions])
    batch = score_rows({"flaky": 1.0}, [{"answer": "1"}] * 3, ["ab", "", "abcd"])
    assert batch.failures == {"flaky": 1}
    np.testing.assert_array_equal(batch.total[[0, 2]], [0.5, 0.25])
    assert math.isnan(batch.total[1])


# ---- TRL datasets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["conversational", "text"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_trl_layout_dataset_loads_without_renaming(layout, suffix, tmp_path):
    rows = build_rows(str(write_dataset(tmp_path / f"trl{suffix}", layout)), 8, [0])
    assert len(rows) == 4 and [r["solution"] for r in rows] == SOLUTIONS
    assert [r["answer"] for r in rows] == SOLUTIONS  # the gold answer of `correct` and the evaluation
    if layout == "conversational":
        assert rows[2]["prompt"] == [{"role": "user", "content": QUESTIONS[2]}]
    else:
        assert rows[2]["prompt"] == f"Q: {QUESTIONS[2]}\nA:"
    assert [r["question"] for r in rows] == (QUESTIONS if layout == "conversational"
                                             else [f"Q: {q}\nA:" for q in QUESTIONS])


def test_dataset_without_a_prompt_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hi", "solution": "1"}) + "\n")
    with pytest.raises(UserError, match="has no prompt column: give each row a `prompt`"):
        build_rows(str(path), 4, [0])


# ---- through the CLIs on the tiny model --------------------------------------------------------------

STAGE1_WEIGHTS = {"conversational": "reward_len=1,num_tokens=0.1,solution_length=0,accuracy=1,"
                                    "none_on_odd_start=1,async_chars=1,overlong=1",
                  "text": "reward_len_text=1,num_tokens=0.1,solution_length=0,none_on_odd_start=1,async_chars=1,"
                          "overlong=1"}


def _stage1(model_dir, dataset, out, rewards_spec):
    return CliRunner().invoke(generate_paired_rollouts.main, [
        "--model_name", str(model_dir), "--task_name", str(dataset), "--levels", "0", "--num_prompts", "4",
        "--group_size", "4", "--max_new_tokens", "10", "--out_dir", str(out), "--rewards", rewards_spec])


@pytest.mark.parametrize("layout", ["conversational", "text"])
def test_stage1_scores_trl_style_rewards(layout, tiny_model_dir, tmp_path, trl_rewards):
    dataset = write_dataset(tmp_path / "trl.jsonl", layout)
    result = _stage1(tiny_model_dir, dataset, tmp_path / "out", STAGE1_WEIGHTS[layout])
    assert result.exit_code == 0, result.output
    (dump,) = (tmp_path / "out").glob("trl/tiny-llama/rollouts_*")
    frame = read_dump(dump).to_pandas()
    assert len(frame) == 16
    length = "reward_len" if layout == "conversational" else "reward_len_text"
    np.testing.assert_array_equal(frame[f"reward_{length}"], -(20 - frame["completion_text"].str.len()).abs())
    np.testing.assert_array_equal(frame["reward_num_tokens"], frame["num_completion_tokens"])
    np.testing.assert_array_equal(frame["reward_solution_length"],
                                  [len(SOLUTIONS[i]) for i in frame["prompt_id"]])
    np.testing.assert_allclose(frame["reward_async_chars"], frame["completion_text"].str.len() / 100)
    n = frame["num_completion_tokens"]
    np.testing.assert_allclose(frame["reward_overlong"], np.where(n <= 6, 0.0, (6 - n) / 6))
    odd = frame["completion_token_ids"].map(lambda ids: ids[0] % 2 == 1)
    assert 0 < odd.sum() < len(frame)
    assert frame.loc[odd, "reward_none_on_odd_start"].isna().all()
    assert (frame.loc[~odd, "reward_none_on_odd_start"] == 1).all()
    if layout == "conversational":
        assert frame.loc[frame["prompt_id"] == 3, "reward_accuracy"].isna().all()  # gold cannot be parsed
        assert frame.loc[frame["prompt_id"] != 3, "reward_accuracy"].isin([0.0, 1.0]).all()
    weights = scoring.parse_reward_weights(STAGE1_WEIGHTS[layout], {})
    expected = scoring.weighted_total({k: frame[f"reward_{k}"].to_numpy() for k in weights}, weights)
    np.testing.assert_allclose(frame["reward"], expected)
    assert frame["reward"].notna().all()  # some function scores every row
    meta = json.loads((dump / "rollouts_metadata.json").read_text())
    assert meta["reward_logs_this_run"]["metrics"] == {"global_step_seen": 0.0}
    assert meta["reward_logs_this_run"]["extra"]["chars"] == pytest.approx(frame["completion_text"].str.len().mean())


def test_stage1_rows_with_no_reward_are_nan_and_left_out_of_group_statistics(tiny_model_dir, tmp_path, trl_rewards):
    dataset = write_dataset(tmp_path / "trl.jsonl", "conversational")
    result = _stage1(tiny_model_dir, dataset, tmp_path / "out", "accuracy=1,none_on_odd_start=0.5")
    assert result.exit_code == 0, result.output
    frame = read_dump(next((tmp_path / "out").glob("trl/tiny-llama/rollouts_*"))).to_pandas()
    unscored = (frame["prompt_id"] == 3) & frame["completion_token_ids"].map(lambda ids: ids[0] % 2 == 1)
    assert unscored.any() and frame.loc[unscored, "reward"].isna().all()
    assert frame.loc[~unscored, "reward"].notna().all()
    for _, group in frame.groupby("group_id"):
        scored = group["reward"].dropna()
        np.testing.assert_allclose(group["reward_group_mean"], scored.mean() if len(scored) else np.nan)
        np.testing.assert_allclose(group["reward_group_var"], scored.var(ddof=1) if len(scored) > 1 else np.nan)


def test_stage1_refuses_a_reward_whose_column_is_missing(tiny_model_dir, tmp_path, trl_rewards):
    dataset = write_dataset(tmp_path / "trl.jsonl", "conversational", with_solution=False)
    result = CliRunner().invoke(generate_paired_rollouts.main, [
        "--model_name", str(tiny_model_dir), "--task_name", str(dataset), "--levels", "0", "--num_prompts", "4",
        "--group_size", "2", "--out_dir", str(tmp_path / "out"), "--rewards", "reward_len=1,solution_length=1"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reward 'solution_length' needs column(s) solution" in lines[0]
    assert not (tmp_path / "out").exists()


STAGE3 = ["--levels", "0", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "10",
          "--eval_prompts", "1", "--num_train_prompts", "4", "--max_steps", "2", "--eval_every", "2"]


def test_stage3_trains_on_trl_style_rewards(tiny_model_dir, tmp_path, trl_rewards):
    dataset = write_dataset(tmp_path / "trl.jsonl", "conversational")
    result = CliRunner().invoke(train_grpo_softmask.main, [
        "--model_name", str(tiny_model_dir), "--task_name", str(dataset), *STAGE3, "--out_dir", str(tmp_path),
        "--rewards", STAGE1_WEIGHTS["conversational"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("trl/tiny-llama/grpo/*")
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["global_step_seen"].tolist() == [0, 1]  # log_metric, with trainer_state.global_step
    for name in ("reward_len", "num_tokens", "async_chars", "overlong", "none_on_odd_start"):
        assert metrics[f"reward/{name}"].notna().all(), name
    assert metrics["reward_mean"].notna().all() and metrics["reward_std"].gt(0).all()
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(samples) == 16
    np.testing.assert_array_equal(samples["reward_reward_len"], -(20 - samples["completion"].str.len()).abs())
    np.testing.assert_allclose(samples["reward_async_chars"], samples["completion"].str.len() / 100)
    assert samples["chars"].tolist() == samples["completion"].str.len().tolist()  # log_extra column
    assert samples["gold_parsed"].notna().all()  # accuracy_reward's own log_extra


def test_stage3_stops_when_a_reward_fails_on_every_row(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "needs_solution",
                        lambda completions, **kwargs: [float(s in c[0]["content"]) for s, c in
                                                       zip(kwargs["solution"], completions, strict=True)])
    dataset = write_dataset(tmp_path / "trl.jsonl", "conversational")
    (tmp_path / "plain.jsonl").write_text(dataset.read_text().replace('"solution"', '"answer"'))
    result = CliRunner().invoke(train_grpo_softmask.main, [
        "--model_name", str(tiny_model_dir), "--task_name", str(tmp_path / "plain.jsonl"), *STAGE3,
        "--out_dir", str(tmp_path / "out"), "--rewards", "needs_solution=1"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("error: reward 'needs_solution' failed on every completion of the batch: "
                         "KeyError: 'solution' (the dataset has no column 'solution')")
