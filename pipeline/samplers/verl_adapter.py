"""Use any pipeline sampler as verl's curriculum data sampler, so a run that moves to verl on a
cluster keeps its curriculum. verl (checked against volcengine/verl main, commit b178a3c,
2026-01-29) builds `cls(data_source=train_dataset, data_config=config.data)` from
`data.sampler.class_path` / `class_name` (`create_rl_sampler`, verl/trainer/main_ppo.py), iterates
it through a StatefulDataLoader (batch size data.gen_batch_size or data.train_batch_size,
drop_last), calls `sampler.update(batch=batch)` at the end of every step when the sampler is an
AbstractCurriculumSampler (`RayPPOTrainer.fit`), and checkpoints it through
state_dict/load_state_dict.

    data.sampler.class_path=pkg://pipeline.samplers.verl_adapter
    data.sampler.class_name=VerlSampler
    +data.sampler.name=variance_regularized      # any name pipeline.samplers.build accepts
    +data.sampler.total_steps=500                # the schedule's T (default: one epoch)
    +data.sampler.warmup_steps=20                # every other key is a sampler parameter
    data.dataloader_num_workers=0                # verl requires 0 for curriculum samplers

The multi-source design's class names work as `class_name` as they are, without `name`:
`MultiSourceSampler`, `TimeCurriculumSampler`, `RewardCurriculumSampler` and the legacy
`CurriculumMultiSourceSampler`, `RewardGatedCurriculumSampler`, with that design's defaults (the
curricula's `complexity_source` is `logicif` when the data has that source).

Rows come from the dataset's parquet columns: `data_source` is the source, and `extra_info`
holds the level (`level_key`, default "level"; 0 when absent), the complexity (`complexity_key`,
default "complexity_score", as in the original multi-source design) and the prompt id (`index_key`,
default "index"; must be unique, verl's example preprocessing writes the row number). At
`update(batch)` time verl's batch holds that id in `non_tensor_batch["extra_info"][i][index_key]`:
`RayPPOTrainer._get_gen_batch` moved every other non-tensor key, the top-level `index` that
RLHFDataset adds included, into the generation batch, and the rollout output does not bring it
back. A top-level `index_key` column is read when extra_info lacks the id. The reward of a
response is `batch.batch[reward_key].sum(-1)` (default "token_level_scores", the reward before
any KL penalty); update() feeds the mean per prompt.

verl is imported lazily: the class derives from verl's AbstractCurriculumSampler when verl is
installed (so verl's isinstance checks pass) and from `object` otherwise (no torch needed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LOG
from pipeline.samplers.registry import SAMPLERS, build, sampler_class

ADAPTER_KEYS = {
    "class_path": None,
    "class_name": None,
    "name": None,
    "total_steps": None,
    "seed": None,
    "level_key": "level",
    "complexity_key": "complexity_score",
    "index_key": "index",
    "reward_key": "token_level_scores",
}


def _curriculum_base() -> type:
    try:
        from verl.experimental.dataset.sampler import AbstractCurriculumSampler
    except ImportError:
        return object
    return AbstractCurriculumSampler


def _plain(value: Any) -> Any:
    """OmegaConf containers -> dict/list (they are Mapping/Sequence), leaving scalars alone."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def dataset_rows(
    dataset: Any, level_key: str, complexity_key: str, index_key: str
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Sampler rows and verl's prompt ids, read from the columns when the dataset has a `dataframe`
    (verl's RLHFDataset: no tokenisation), else row by row."""
    frame = getattr(dataset, "dataframe", None)
    if frame is not None:
        columns = frame.column_names if hasattr(frame, "column_names") else list(frame)
        sources = list(frame["data_source"])
        extras = list(frame["extra_info"]) if "extra_info" in columns else [None] * len(sources)
    else:
        records = [dataset[i] for i in range(len(dataset))]
        sources = [r["data_source"] for r in records]
        extras = [r.get("extra_info") for r in records]
    rows, ids = [], []
    for source, extra in zip(sources, extras, strict=True):
        extra = extra or {}
        row = {"level": int(extra.get(level_key) or 0), "source": str(source)}
        if extra.get(complexity_key) is not None:
            row["complexity"] = float(extra[complexity_key])
        rows.append(row)
        ids.append(extra.get(index_key))
    return rows, ids


def batch_ids(non_tensor_batch: Mapping[str, Any], index_key: str) -> list[Any]:
    """The prompt id of every response of a verl batch: extra_info[i][index_key], else a top-level column."""
    extras = non_tensor_batch.get("extra_info")
    if extras is not None and all(isinstance(e, Mapping) and index_key in e for e in extras):
        return [e[index_key] for e in extras]
    if index_key in non_tensor_batch:
        return list(non_tensor_batch[index_key])
    raise ValueError(f"verl batch has no prompt id: neither extra_info['{index_key}'] nor a '{index_key}' column "
                   f"(non-tensor keys: {', '.join(sorted(non_tensor_batch))})")


class VerlSampler(_curriculum_base()):
    """A verl data sampler driving one pipeline sampler (see the module docstring for the config)."""

    sampler_name: str | None = None  # set by the classes named after the multi-source design's samplers
    default_complexity_source: str | None = None  # that design's default, used when the data has the source

    def __init__(self, data_source: Any, data_config: Any):
        config = _plain(data_config.get("sampler") or {})
        opts = {k: config.pop(k, default) for k, default in ADAPTER_KEYS.items()}
        name = opts["name"] or self.sampler_name
        if name is None:
            raise ValueError(f"set +data.sampler.name to one of {', '.join(SAMPLERS)}")
        if self.sampler_name and sampler_class(name) is not sampler_class(self.sampler_name):
            raise ValueError(f"data.sampler.class_name={type(self).__name__} is the '{self.sampler_name}' sampler; "
                             f"drop +data.sampler.name={name} or use class_name=VerlSampler")
        batch_size = int(data_config.get("gen_batch_size") or data_config.get("train_batch_size"))
        rows, ids = dataset_rows(data_source, opts["level_key"], opts["complexity_key"], opts["index_key"])
        if self.default_complexity_source in {row["source"] for row in rows}:
            config.setdefault("complexity_source", self.default_complexity_source)
        self._row_of = {key: row for row, key in enumerate(ids)}
        if None in self._row_of or len(self._row_of) != len(ids):
            raise ValueError(
                f"verl identifies prompts by extra_info.{opts['index_key']}, which must be present and unique "
                f"per row ({len(self._row_of)} distinct values for {len(ids)} rows); write the row number there"
            )
        self.steps_per_epoch = max(1, len(rows) // batch_size)
        if opts["total_steps"] is None:
            LOG.warning("[VerlSampler] no data.sampler.total_steps: the schedule spans one epoch")
        seed = opts["seed"] if opts["seed"] is not None else data_config.get("seed") or 0
        self.reward_key, self.index_key = opts["reward_key"], opts["index_key"]
        self.sampler = build(
            name,
            rows,
            batch_size=batch_size,
            total_steps=int(opts["total_steps"] or self.steps_per_epoch),
            seed=int(seed),
            **config,
        )
        self._pending: list[int] = []
        self._served = 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.sampler.batch_size

    def __iter__(self) -> Iterator[int]:
        """One epoch of row indices, a batch from next_batch() at a time; a resumed run finishes its epoch."""
        while True:
            if not self._pending:
                self._pending = self.sampler.next_batch()
            index = self._pending.pop(0)
            self._served += 1
            yield index
            if self._served % len(self) == 0:
                return

    def update(self, batch: Any) -> None:
        """verl's hook after each step: mean reward per prompt -> sampler.update."""
        ids = batch_ids(batch.non_tensor_batch, self.index_key)
        scores = np.asarray(batch.batch[self.reward_key].sum(-1).tolist(), dtype=np.float64)
        rows = np.array([self._row_of[i] for i in ids])
        prompts, first = np.unique(rows, return_index=True)
        order = np.argsort(first)  # prompts in the order they appear in the batch
        means = [scores[rows == p].mean() for p in prompts[order]]
        self.sampler.update(prompts[order].tolist(), means)

    def probabilities(self) -> dict[str, float]:
        return self.sampler.probabilities()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "pending": list(self._pending), "served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._pending = [int(i) for i in state["pending"]]
        self._served = int(state["served"])


class MultiSourceSampler(VerlSampler):
    """``data.sampler.class_name=MultiSourceSampler``: the ``multi_source`` sampler."""

    sampler_name = "multi_source"


class TimeCurriculumSampler(VerlSampler):
    """``data.sampler.class_name=TimeCurriculumSampler``: ``time_curriculum``, on ``logicif`` by default."""

    sampler_name = "time_curriculum"
    default_complexity_source = "logicif"


class RewardCurriculumSampler(VerlSampler):
    """``data.sampler.class_name=RewardCurriculumSampler``: ``reward_curriculum``, on ``logicif`` by default."""

    sampler_name = "reward_curriculum"
    default_complexity_source = "logicif"


CurriculumMultiSourceSampler = TimeCurriculumSampler  # the multi-source design's legacy names
RewardGatedCurriculumSampler = RewardCurriculumSampler
