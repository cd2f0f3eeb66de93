"""The verl adapter (driven the way verl's trainer drives it), the plot CLI, and the no-torch rule.

verl itself is not installed here (it pulls ray/vllm); the adapter is tested through duck typing:
a dataset with verl's `dataframe` columns, a DataProto-like batch, and a stand-in verl module
for the base-class check.
"""

import importlib
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.samplers import build, plot, verl_adapter

N_RESPONSES = 3


class FakeDataset:
    """verl's RLHFDataset as the adapter sees it: `dataframe` columns data_source / extra_info."""

    def __init__(self, n=40, ids=None):
        ids = ids if ids is not None else [1000 + i for i in range(n)]
        self.dataframe = {
            "data_source": ["gsm8k" if i % 2 else "math" for i in range(n)],
            "extra_info": [{"index": ids[i], "level": i % 4, "complexity_score": float(i)} for i in range(n)],
        }

    def __len__(self):
        return len(self.dataframe["data_source"])


def config(batch_size=4, **sampler):
    return {"train_batch_size": batch_size, "seed": 7, "sampler": {
        "class_path": "pkg://pipeline.samplers.verl_adapter", "class_name": "VerlSampler", **sampler}}  # fmt: skip


def epoch(sampler):
    """What verl's StatefulDataLoader does: chunk one iter() of the sampler into batches (drop_last)."""
    it, batches = iter(sampler), []
    while True:
        batch = [i for _, i in zip(range(sampler.sampler.batch_size), it, strict=False)]
        if len(batch) < sampler.sampler.batch_size:
            return batches
        batches.append(batch)


def verl_batch(rows, reward_of_row):
    """A DataProto-like batch after rollout: each prompt repeated n times (interleaved), token scores."""
    ids = np.array([1000 + r for r in rows for _ in range(N_RESPONSES)], dtype=object)
    scores = np.zeros((len(ids), 5))
    for k, r in enumerate(np.repeat(rows, N_RESPONSES)):
        scores[k, -1] = reward_of_row(r, k % N_RESPONSES)
    return SimpleNamespace(batch={"token_level_scores": scores}, non_tensor_batch={"index": ids})


def test_epoch_length_and_batches_follow_the_wrapped_sampler():
    sampler = verl_adapter.VerlSampler(FakeDataset(42), config(name="step", total_steps=30))
    assert len(sampler) == 40 and sampler.steps_per_epoch == 10  # 42 // 4 batches, drop_last
    batches = epoch(sampler)
    assert len(batches) == 10 and sampler.sampler.step == 10
    levels = [{i % 4 for i in b} for b in batches]
    assert levels[:8] == [{0}] * 8 and levels[8:] == [{1}] * 2  # step schedule over T = 30
    assert len(epoch(sampler)) == 10 and sampler.sampler.step == 20  # the next epoch continues the schedule


def test_update_feeds_mean_reward_per_prompt_from_token_scores():
    sampler = verl_adapter.VerlSampler(FakeDataset(), config(name="learnability", alpha=1.0, total_steps=5))
    rows = [5, 2, 5, 9]  # a prompt drawn twice shares its id: one mean over its 6 responses
    sampler.update(batch=verl_batch(rows, lambda r, k: float(k == 0) + r / 100))
    success = sampler.sampler.success
    assert success[[2, 5, 9]].tolist() == pytest.approx([1 / 3 + 0.02, 1 / 3 + 0.05, 1 / 3 + 0.09])
    assert np.isnan(success[[0, 1, 3]]).all()


def test_rows_come_from_data_source_and_extra_info():
    sampler = verl_adapter.VerlSampler(
        FakeDataset(),
        config(name="reward_curriculum", complexity_source="math", reward_threshold=0.5, num_intervals=2),
    )
    inner = sampler.sampler
    assert inner.table.source_names == ["gsm8k", "math"]
    assert inner.table.level_values.tolist() == [0, 1, 2, 3]
    assert inner.table.complexity[inner.cs_order].tolist() == [float(i) for i in range(0, 40, 2)]
    assert inner.total_steps == 10  # no total_steps: one epoch


def test_hf_datasets_frame_is_read_by_columns():
    datasets = pytest.importorskip("datasets")
    frame = datasets.Dataset.from_dict(FakeDataset(8).dataframe)
    rows, ids = verl_adapter.dataset_rows(
        SimpleNamespace(dataframe=frame), "level", "complexity_score", "index"
    )
    assert ids == list(range(1000, 1008))
    assert rows[3] == {"level": 3, "source": "gsm8k", "complexity": 3.0}


def test_state_round_trip_mid_epoch_through_json():
    cfg = config(name="variance_regularized", total_steps=40, warmup_steps=2, update_period=2)
    a = verl_adapter.VerlSampler(FakeDataset(), cfg)
    it = iter(a)
    for _ in range(3):
        rows = [next(it) for _ in range(4)]
        a.update(batch=verl_batch(rows, lambda r, k: float(r % 4 == 0)))
    state = json.loads(json.dumps(a.state_dict()))
    b = verl_adapter.VerlSampler(FakeDataset(), config(name="variance_regularized", total_steps=40, warmup_steps=2,
                                                       update_period=2, seed=123))  # fmt: skip
    b.load_state_dict(state)
    rest_a = [next(it) for _ in range(7 * 4)]  # the old iterator finishes its epoch
    assert next(it, None) is None
    rest_b = [i for batch in epoch(b) for i in batch]  # a fresh iterator after load resumes mid-epoch
    assert rest_b == rest_a
    assert epoch(a) == epoch(b)


def test_dataset_ids_must_be_unique_and_name_given():
    with pytest.raises(ValueError, match=r"extra_info.index, which must be present and unique per row "
                                         r"\(1 distinct values for 40 rows\)"):  # fmt: skip
        verl_adapter.VerlSampler(FakeDataset(ids=[0] * 40), config(name="balanced"))
    with pytest.raises(ValueError, match="set \\+data.sampler.name to one of balanced, step"):
        verl_adapter.VerlSampler(FakeDataset(), config())
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) for sampler 'cosine': sigma"):
        verl_adapter.VerlSampler(FakeDataset(), config(name="cosine", sigma=1))


def test_nested_config_values_become_plain_python():
    cfg = config(name="multi_source", source_weights={"gsm8k": 3.0, "math": 1.0})
    sampler = verl_adapter.VerlSampler(FakeDataset(), cfg)
    assert sampler.probabilities() == {"source_gsm8k": 0.75, "source_math": 0.25}


def test_subclasses_verls_abstract_curriculum_sampler_when_verl_is_importable(monkeypatch):
    class AbstractCurriculumSampler:
        def update(self, batch):
            raise NotImplementedError

    fake = types.ModuleType("verl.experimental.dataset.sampler")
    fake.AbstractCurriculumSampler = AbstractCurriculumSampler
    for name in ("verl", "verl.experimental", "verl.experimental.dataset"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.experimental.dataset.sampler", fake)
    try:
        module = importlib.reload(verl_adapter)
        assert issubclass(module.VerlSampler, AbstractCurriculumSampler)
        sampler = module.VerlSampler(FakeDataset(), config(name="balanced"))
        assert isinstance(sampler, AbstractCurriculumSampler)  # verl's create_rl_sampler / trainer checks
    finally:
        monkeypatch.undo()
        assert importlib.reload(verl_adapter).VerlSampler.__bases__ == (object,)


def test_plot_cli_writes_a_png(tmp_path):
    out = tmp_path / "vr.png"
    result = CliRunner().invoke(
        plot.main,
        [
            "variance_regularized",
            "--steps",
            "30",
            "--levels",
            "3",
            "--param",
            "warmup_steps=5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(
        plot.main, ["gaussian", "--steps", "5", "--param", "sigmaa=1", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "valid: mu_exp=0.5, sigma=0.5, min_prob=True" in bad.output


def test_simulated_learner_rewards_follow_skill():
    rows = plot.synthetic_rows(levels=3, sources=2, rows_per_group=5, seed=0)
    assert len(rows) == 30 and {r["source"] for r in rows} == {"src0", "src1"}
    sampler = build("step", rows, batch_size=10, total_steps=30)
    history = plot.simulate(sampler, rows, steps=30, learning_rate=0.01, seed=0)
    assert len(history) == 30 and history[0] == {"level_0": 1.0, "level_1": 0.0, "level_2": 0.0}


def test_sampler_package_never_imports_torch():
    code = (
        "import sys, pipeline.samplers, pipeline.samplers.plot, pipeline.samplers.verl_adapter; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
