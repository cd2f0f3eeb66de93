"""Stage-2 data: which pairs are kept, how z is computed under both --group_stats, the split by prompt."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.importance.data import (
    PairDataModule,
    PairDataset,
    collate,
    load_pairs,
    reward_column,
    split_by_prompt,
)
from pipeline.importance.sampling import ShardSampler
from pipeline.importance.train import default_run_dir
from pipeline.models import load_tokenizer
from tests.synthetic_dump import LENGTH, write_synthetic_dump


@pytest.fixture(scope="module")
def dump(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rollouts_x" / "part-00000.parquet"
    return write_synthetic_dump(path, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir), n_prompts=12,
                                groups_per_prompt=2, zero_variance_prompts=2, nan_groups=3, seed=5)


def test_counts_name_every_dropped_pair(dump):
    rows = pq.read_table(dump).to_pandas()
    a = rows[rows.sister == 0]
    pairs, counts, column = load_pairs(dump, "reward", "group")
    assert column == "reward"
    assert counts["rows"] == 12 * 2 * 8 and counts["pairs"] == 12 * 2 * 4 and counts["pairs_incomplete"] == 0
    assert counts["pairs_degenerate"] == int(a.degenerate.sum()) == int((a.split_token_idx == LENGTH).sum())
    assert counts["groups_zero_variance"] == 4  # 2 constant prompts x 2 groups
    assert counts["groups_nonfinite"] == 3
    kept = counts["pairs"] - counts["pairs_degenerate"] - counts["pairs_nonfinite"] - counts["pairs_zero_variance"]
    assert counts["pairs_kept"] == len(pairs) == kept
    assert np.isfinite(pairs.z1).all() and np.isfinite(pairs.z2).all()


@pytest.mark.parametrize("group_stats", ["group", "prompt"])
def test_z_uses_the_chosen_statistics(dump, group_stats):
    rows = pq.read_table(dump).to_pandas()
    pairs, _, _ = load_pairs(dump, "marker", group_stats)
    i = len(pairs) // 2
    group = rows[rows.group_id == pairs.group_id[i]]
    pool = group if group_stats == "group" else rows[rows.prompt_id == pairs.prompt_id[i]]
    m, v = pool.reward_marker.mean(), pool.reward_marker.var(ddof=1)
    assert pairs.z1[i] == pytest.approx((pairs.r1[i] - m) / np.sqrt(v))
    assert pairs.z2[i] == pytest.approx((pairs.r2[i] - m) / np.sqrt(v))


def test_prompt_stats_skip_a_failed_reward_but_drop_its_pair(dump):
    rows = pq.read_table(dump).to_pandas()
    failed = rows[rows.reward.isna()]
    assert len(failed) == 3
    _, group_counts, _ = load_pairs(dump, "reward", "group")
    _, prompt_counts, _ = load_pairs(dump, "reward", "prompt")
    # group stats: every pair of a failed group is lost; prompt stats: only the pair holding the NaN
    assert prompt_counts["pairs_nonfinite"] == int((~failed.degenerate).sum()) < group_counts["pairs_nonfinite"]


def test_pairs_input_is_prompt_plus_shared_prefix(dump):
    pairs, _, _ = load_pairs(dump)
    rows = pq.read_table(dump).to_pandas()
    i = 7
    b = rows[(rows.group_id == pairs.group_id[i]) & (rows.sister == 1)]
    b = b[[np.array_equal(c[: pairs.split[i]], pairs.completion[i][: pairs.split[i]]) for c in b.completion_token_ids]]
    assert len(b) >= 1
    dataset = PairDataset(pairs)
    batch = collate([dataset[j] for j in (i, i + 1)])
    assert [len(p) for p in batch["prefix"]] == batch["split"].tolist() == [pairs.split[i], pairs.split[i + 1]]
    assert batch["prompt"][0].tolist() == pairs.prompt[i].tolist()
    assert batch["prefix"][0].tolist() == pairs.completion[i][: pairs.split[i]].tolist()
    assert batch["p"][0].item() == pytest.approx(pairs.mean[i])
    assert batch["r1"][0].item() == pytest.approx(pairs.r1[i]) and batch["z2"][1].item() == pytest.approx(pairs.z2[i + 1])


def test_split_is_by_prompt_and_reproducible(dump):
    pairs, _, _ = load_pairs(dump)
    train, val = split_by_prompt(pairs, 0.25, seed=3)
    assert not set(train.prompt_id) & set(val.prompt_id)
    assert len(train) + len(val) == len(pairs) and len(set(val.prompt_id)) == 2  # 25% of the 10 informative prompts
    again = split_by_prompt(pairs, 0.25, seed=3)[1]
    assert np.array_equal(val.index, again.index)


def test_datamodule_batches(dump):
    dm = PairDataModule(dump, batch_size=5, val_fraction=0.3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 5 and batch["z1"].dtype.is_floating_point
    assert ((batch["relative"] >= 0) & (batch["relative"] < 1)).all()
    assert dm.counts["pairs_train"] + dm.counts["pairs_val"] == dm.counts["pairs_kept"]


def test_reward_key_accepts_column_or_name():
    columns = ["reward", "reward_group_mean", "reward_marker", "reward_marker_group_var"]
    assert reward_column("marker", columns) == "reward_marker"
    assert reward_column("reward_marker", columns) == "reward_marker"
    with pytest.raises(UserError, match="reward_key 'nope'.*reward, reward_marker"):
        reward_column("nope", columns)
    with pytest.raises(UserError):
        reward_column("reward_group_mean", columns)


def test_sisters_that_do_not_share_their_prefix_are_refused(dump, tmp_path):
    table = pq.read_table(dump)
    rows = table.to_pylist()
    victim = next(r for r in rows if r["sister"] == 1 and not r["degenerate"] and r["split_token_idx"] > 0
                  and np.isfinite(r["reward_group_var"]) and r["reward_group_var"] > 0)
    victim["completion_token_ids"] = [victim["completion_token_ids"][0] + 1] + victim["completion_token_ids"][1:]
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(table.from_pylist(rows, schema=table.schema), corrupt)
    with pytest.raises(UserError, match="1 non-degenerate pair"):
        load_pairs(corrupt)


def test_default_run_dir_sits_beside_the_dump(tmp_path):
    model_dir = tmp_path / "task" / "model"
    (model_dir / "rollouts_a").mkdir(parents=True)
    (model_dir / "rollouts_a" / "part-00000.parquet").touch()
    (model_dir / "rollouts_b.parquet").touch()
    expected = model_dir / "importance_net" / "run"
    assert default_run_dir(model_dir / "rollouts_a", "run", None) == expected
    assert default_run_dir(model_dir / "rollouts_a" / "part-00000.parquet", "run", None) == expected
    assert default_run_dir(model_dir / "rollouts_b.parquet", "run", None) == expected


@pytest.mark.parametrize("size", [10, 11])
def test_shards_are_fixed_disjoint_and_cover_every_pair(size):
    """Each pair belongs to one rank for the whole run (its frozen features are computed once); training
    shards are equally long, validation shards hold every pair exactly once."""
    train = [ShardSampler(size, rank, 2, seed=3, shuffle=True) for rank in range(2)]
    epochs = []
    for epoch in range(3):
        for sampler in train:
            sampler.set_epoch(epoch)
        epochs.append([list(sampler) for sampler in train])
    for shards in epochs:
        assert len(shards[0]) == len(shards[1]) == -(-size // 2)
        assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(size))
        assert [set(s) for s in shards] == [set(s) for s in epochs[0]]  # the same pairs every epoch
    assert epochs[0][0] != epochs[1][0]  # in a new order
    val = [list(ShardSampler(size, rank, 2, shuffle=False)) for rank in range(2)]
    assert sorted(val[0] + val[1]) == list(range(size))
