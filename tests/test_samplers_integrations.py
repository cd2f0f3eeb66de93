"""The verl adapter (driven the way verl's trainer drives it), the plot CLI, and the no-torch rule.

verl itself is not installed here (it pulls ray/vllm); the adapter is tested against a replay of
what verl main (commit b178a3c, 2026-01-29) does: RLHFDataset.__getitem__ and collate_fn
(verl/utils/dataset/rl_dataset.py), then RayPPOTrainer.fit's step up to `sampler.update(batch=batch)`
(verl/trainer/ppo/ray_trainer.py: uid, _get_gen_batch, repeat, union with the rollout output,
token_level_scores, _balance_batch's reorder), and a stand-in verl module for the base-class check.
"""

import importlib
import json
import subprocess
import sys
import types
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.samplers import build, plot, verl_adapter

N_RESPONSES = 3
RESPONSE_LENGTH = 5


class FakeDataset:
    """verl's RLHFDataset: parquet columns in `dataframe`, rows as its __getitem__ returns them."""

    def __init__(self, n=40, ids=None, sources=("math", "gsm8k")):
        ids = ids if ids is not None else [1000 + i for i in range(n)]
        self.dataframe = {
            "data_source": [sources[i % len(sources)] for i in range(n)],
            "prompt": [[{"role": "user", "content": f"question {i}"}] for i in range(n)],
            "ability": ["math"] * n,
            "reward_model": [{"style": "rule", "ground_truth": str(i)} for i in range(n)],
            "extra_info": [{"split": "train", "index": ids[i], "level": i % 4, "complexity_score": float(i)}
                           for i in range(n)],
        }

    def __len__(self):
        return len(self.dataframe["data_source"])

    def __getitem__(self, item):
        row = {key: column[item] for key, column in self.dataframe.items()}
        row["raw_prompt"] = row["prompt"]
        row["dummy_tensor"] = torch.tensor([0], dtype=torch.uint8)
        extra = row.get("extra_info") or {}
        row["extra_info"] = extra
        row["index"] = extra.get("index", 0)
        row["tools_kwargs"] = extra.get("tools_kwargs", {})
        row["interaction_kwargs"] = extra.get("interaction_kwargs", {})
        return row


class Proto:
    """The parts of verl's DataProto a training step uses: tensors in `batch`, object arrays in
    `non_tensor_batch`, with pop / repeat(interleave=True) / union / reorder."""

    def __init__(self, batch, non_tensor_batch):
        self.batch, self.non_tensor_batch = batch, non_tensor_batch

    @classmethod
    def from_rows(cls, rows):  # collate_fn: tensors stacked, everything else an object array
        keys = rows[0].keys()
        tensors = {k: torch.stack([r[k] for r in rows]) for k in keys if isinstance(rows[0][k], torch.Tensor)}
        objects = {k: np.fromiter((r[k] for r in rows), dtype=object, count=len(rows)) for k in keys
                   if k not in tensors}  # fmt: skip
        return cls(tensors, objects)

    def pop(self, non_tensor_batch_keys):
        return Proto({}, {k: self.non_tensor_batch.pop(k) for k in non_tensor_batch_keys})

    def repeat(self, n):
        return Proto({k: v.repeat_interleave(n, dim=0) for k, v in self.batch.items()},
                     {k: np.repeat(v, n, axis=0) for k, v in self.non_tensor_batch.items()})  # fmt: skip

    def union(self, other):
        return Proto({**self.batch, **other.batch}, {**self.non_tensor_batch, **other.non_tensor_batch})

    def reorder(self, order):
        self.batch = {k: v[torch.as_tensor(order)] for k, v in self.batch.items()}
        self.non_tensor_batch = {k: v[order] for k, v in self.non_tensor_batch.items()}


def verl_step(dataset, rows, reward_of_row, seed=0):
    """One step of RayPPOTrainer.fit on the prompts `rows`, as the batch reaches sampler.update."""
    batch = Proto.from_rows([dataset[r] for r in rows])
    batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in rows], dtype=object)
    kept = {"data_source", "reward_model", "extra_info", "uid"} & batch.non_tensor_batch.keys()
    gen_batch = batch.pop(non_tensor_batch_keys=list(set(batch.non_tensor_batch) - kept))  # _get_gen_batch
    gen_output = gen_batch.repeat(N_RESPONSES)  # the agent loop returns responses and its own keys only
    gen_output = Proto({"responses": torch.zeros(len(rows) * N_RESPONSES, RESPONSE_LENGTH, dtype=torch.long)},
                       {"__num_turns__": np.full(len(rows) * N_RESPONSES, 2, dtype=np.int32)})  # fmt: skip
    batch = batch.repeat(N_RESPONSES).union(gen_output)
    scores = torch.zeros(len(rows) * N_RESPONSES, RESPONSE_LENGTH)
    for k, r in enumerate(np.repeat(rows, N_RESPONSES)):
        scores[k, -1] = reward_of_row(r, k % N_RESPONSES)  # the reward sits on the last response token
    batch.batch["token_level_scores"] = scores
    batch.reorder(np.random.default_rng(seed).permutation(len(scores)))  # _balance_batch
    return batch


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


def test_epoch_length_and_batches_follow_the_wrapped_sampler():
    sampler = verl_adapter.VerlSampler(FakeDataset(42), config(name="step", total_steps=30))
    assert len(sampler) == 40 and sampler.steps_per_epoch == 10  # 42 // 4 batches, drop_last
    batches = epoch(sampler)
    assert len(batches) == 10 and sampler.sampler.step == 10
    levels = [{i % 4 for i in b} for b in batches]
    assert levels[:8] == [{0}] * 8 and levels[8:] == [{1}] * 2  # step schedule over T = 30
    assert len(epoch(sampler)) == 10 and sampler.sampler.step == 20  # the next epoch continues the schedule


def test_update_feeds_mean_reward_per_prompt_from_verls_batch():
    dataset = FakeDataset()
    sampler = verl_adapter.VerlSampler(dataset, config(name="learnability", alpha=1.0, total_steps=5))
    rows = [5, 2, 5, 9]  # a prompt drawn twice shares its id: one mean over its 6 responses
    batch = verl_step(dataset, rows, lambda r, k: float(k == 0) + r / 100)
    # what verl leaves at update time: the dataset's top-level `index` went to the generation batch
    assert set(batch.non_tensor_batch) == {"data_source", "reward_model", "extra_info", "uid", "__num_turns__"}
    sampler.update(batch=batch)
    success = sampler.sampler.success
    assert success[[2, 5, 9]].tolist() == pytest.approx([1 / 3 + 0.02, 1 / 3 + 0.05, 1 / 3 + 0.09])
    assert np.isnan(success[[0, 1, 3]]).all()


def test_update_falls_back_to_a_top_level_index_column():
    dataset = FakeDataset()
    sampler = verl_adapter.VerlSampler(dataset, config(name="learnability", alpha=1.0, total_steps=5))
    batch = verl_step(dataset, [4, 7], lambda r, k: r / 10)
    ids = [extra["index"] for extra in batch.non_tensor_batch["extra_info"]]
    batch.non_tensor_batch.update(extra_info=np.array([{"split": "train"}] * len(ids), dtype=object),
                                  index=np.array(ids, dtype=object))  # fmt: skip
    sampler.update(batch=batch)
    assert sampler.sampler.success[[4, 7]].tolist() == pytest.approx([0.4, 0.7])
    del batch.non_tensor_batch["index"]
    with pytest.raises(ValueError, match=r"neither extra_info\['index'\] nor an? 'index' column"):
        sampler.update(batch=batch)


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
    dataset = FakeDataset()
    a = verl_adapter.VerlSampler(dataset, cfg)
    it = iter(a)
    for step in range(3):
        rows = [next(it) for _ in range(4)]
        a.update(batch=verl_step(dataset, rows, lambda r, k: float(r % 4 == 0), seed=step))
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


# the multi-source design's verl configurations (its README: Quick Start 1-4 and Examples 3 and 5), verbatim
SEED_CONFIGS = {
    "MultiSourceSampler": {"sampling_strategy": "weighted", "source_weights": {"iftrain": 1.0, "logicif": 1.0},
                           "adaptive_weights": True, "alpha": 0.1, "temperature": 0.3, "max_source_ratio": 3.0},
    "TimeCurriculumSampler": {"sampling_strategy": "weighted", "source_weights": {"iftrain": 1.0, "logicif": 1.0},
                              "adaptive_weights": True, "alpha": 0.1, "complexity_source": "logicif",
                              "initial_complexity_percentile": 30, "final_complexity_percentile": 100,
                              "complexity_warmup_steps": 100},
    "RewardCurriculumSampler": {"complexity_source": "logicif", "initial_complexity_percentile": 20,
                                "final_complexity_percentile": 100, "num_intervals": 10, "reward_threshold": 0.125,
                                "focus_new_intervals": True, "interval_decay": 0.5},
    "CurriculumMultiSourceSampler": {"complexity_source": "logicif", "initial_complexity_percentile": 30,
                                     "final_complexity_percentile": 100, "complexity_warmup_steps": 100},
    "RewardGatedCurriculumSampler": {"complexity_source": "logicif", "initial_complexity_percentile": 30,
                                     "num_intervals": 10, "reward_threshold": 0.125},
}  # fmt: skip
SEED_SAMPLER = {"MultiSourceSampler": "multi_source", "TimeCurriculumSampler": "time_curriculum",
                "CurriculumMultiSourceSampler": "time_curriculum", "RewardCurriculumSampler": "reward_curriculum",
                "RewardGatedCurriculumSampler": "reward_curriculum"}  # fmt: skip


def seed_config(class_name, **params):
    return {"train_batch_size": 6, "seed": 1, "sampler": {
        "class_path": "pkg://pipeline.samplers.verl_adapter", "class_name": class_name, **params}}  # fmt: skip


@pytest.mark.parametrize("class_name", sorted(SEED_CONFIGS))
def test_the_multi_source_designs_verl_configs_work_verbatim(class_name):
    dataset = FakeDataset(60, sources=("iftrain", "logicif"))
    cls = getattr(importlib.import_module("pipeline.samplers.verl_adapter"), class_name)  # verl's load_extern_object
    sampler = cls(data_source=dataset, data_config=seed_config(class_name, **SEED_CONFIGS[class_name]))
    inner = sampler.sampler
    assert inner.name == SEED_SAMPLER[class_name]
    assert inner.table.source_names == ["iftrain", "logicif"]
    if inner.name != "multi_source":
        assert inner.complexity_source == "logicif"
    if "adaptive_weights" in SEED_CONFIGS[class_name]:
        assert inner.adaptive and inner.temperature == SEED_CONFIGS[class_name].get("temperature", 1.0)
    it = iter(sampler)
    for step in range(6):  # the logicif source pays less: adaptive weights move towards it
        rows = [next(it) for _ in range(6)]
        sampler.update(batch=verl_step(dataset, rows, lambda r, k: float(r % 2 == 0), seed=step))
    probabilities = sampler.probabilities()
    assert sum(probabilities.values()) == pytest.approx(1.0)
    if class_name in ("MultiSourceSampler", "TimeCurriculumSampler"):
        assert probabilities["source_logicif"] > probabilities["source_iftrain"]


@pytest.mark.parametrize("class_name", ["TimeCurriculumSampler", "RewardCurriculumSampler"])
def test_curricula_default_to_the_logicif_source_when_the_data_has_it(class_name):
    params = {"reward_threshold": 0.5} if class_name == "RewardCurriculumSampler" else {}
    cls = getattr(verl_adapter, class_name)
    assert cls(FakeDataset(sources=("iftrain", "logicif")), seed_config(class_name, **params)).sampler.complexity_source \
        == "logicif"  # fmt: skip
    assert cls(FakeDataset(sources=("math",)), seed_config(class_name, **params)).sampler.complexity_source == "math"
    with pytest.raises(ValueError, match="complexity_source must be one of the sources"):
        cls(FakeDataset(sources=("math", "gsm8k")), seed_config(class_name, **params))
    plain = verl_adapter.VerlSampler(FakeDataset(sources=("iftrain", "logicif")),
                                     config(name="time_curriculum", complexity_source="iftrain"))  # fmt: skip
    assert plain.sampler.complexity_source == "iftrain"


def test_a_named_class_refuses_another_sampler_name():
    with pytest.raises(ValueError, match="class_name=MultiSourceSampler is the 'multi_source' sampler"):
        verl_adapter.MultiSourceSampler(FakeDataset(), seed_config("MultiSourceSampler", name="gaussian"))
    same = verl_adapter.MultiSourceSampler(FakeDataset(), seed_config("MultiSourceSampler", name="MultiSourceSampler"))
    assert same.sampler.name == "multi_source"


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
        seed_named = module.RewardGatedCurriculumSampler(FakeDataset(), seed_config("x", reward_threshold=0.5,
                                                                                    complexity_source="math"))
        assert isinstance(seed_named, AbstractCurriculumSampler)
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
