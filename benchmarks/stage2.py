"""Stage 2: importance-net training throughput (pairs/s) and ``score`` throughput (tokens/s) of the export.

Training goes through ``pipeline.importance.train.run`` (frozen backbone, the default 64-unit head) on the
stage-1 bench's paired dump. Its ``L.Trainer.fit`` is wrapped from here (the pipeline is not
changed) to time the fit and, with an added callback, the training batches of each epoch: with a
frozen backbone the first epoch runs the backbone on every pair and caches the features, later
epochs only train the head, so both are reported.

Scoring against generation, round by round in one process: plain sampling with the stage-1
backend (``gen_prompts`` prompts x G requests, one batch), then ``load(export).score(prompt_ids,
completion_ids)`` of exactly those completions. tokens/s = completion tokens decoded (or scored)
per second, so the ratio is generation time / scoring time of the same tokens. Target (issue):
scoring is at least 10x faster per token than generation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L

from benchmarks import stage1
from benchmarks.common import MODEL, Context, prompts
from benchmarks.timing import Check, Stopwatch, load_average, median, ratio
from pipeline.generation.base import Request, SamplingParams
from pipeline.rollouts import request_seed

TARGET = 10.0


@dataclass
class Config:
    max_epochs: int = 3
    batch_size: int = 16
    val_fraction: float = 0.25
    rounds: int = 3
    gen_prompts: int = 4  # generation side: gen_prompts x group_size plain requests per round
    group_size: int = 8
    max_new_tokens: int = 64
    gen_batch_size: int = 32
    score_batch_size: int = 16  # ImportanceScorer.score's default


QUICK = Config(max_epochs=2, rounds=2, max_new_tokens=32)


class BatchTimer(L.Callback):
    """Wall time of the training batches (forward, backward, optimizer) of each epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append({"batches": 0, "pairs": 0, "seconds": 0.0})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        e = self.epochs[-1]
        e["seconds"] += time.perf_counter() - self._t
        e["batches"] += 1
        e["pairs"] += len(batch["z1"])


def train(ctx: Context, dump_path: Path, cfg: Config) -> dict[str, Any]:
    from pipeline.errors import UserError
    from pipeline.importance import train as importance_train
    from pipeline.importance.config import ImportanceArgs
    from pipeline.importance.data import load_pairs

    timer, fit_time = BatchTimer(), {}
    original_fit = L.Trainer.fit

    def timed_fit(self, *args, **kwargs):
        self.callbacks.append(timer)
        with Stopwatch() as sw:
            result = original_fit(self, *args, **kwargs)
        fit_time["s"] = sw.seconds
        return result

    with mock.patch.object(L.Trainer, "fit", timed_fit), Stopwatch() as total:
        result = importance_train.run(ImportanceArgs(
            str(dump_path), backbone=MODEL, reward_key=stage1.BENCH_REWARD, max_epochs=cfg.max_epochs,
            per_device_train_batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
            out_dir=str(ctx.workdir / "stage2"), run_name="bench", report_examples=0))
    meta = json.loads((Path(result["run_dir"]) / "metadata.json").read_text())
    try:  # how many pairs the task reward itself would have left
        task_reward_pairs = load_pairs(dump_path, "reward")[1]["pairs_kept"]
    except UserError:
        task_reward_pairs = 0
    counts = meta["counts"]
    pairs_train = counts["pairs_train"]
    epochs = timer.epochs
    trained_pairs = sum(e["pairs"] for e in epochs)
    batch_s = sum(e["seconds"] for e in epochs)
    ctx.shared["importance_export"] = result["export"]
    return {
        "export": result["export"], "counts": counts, "epochs": epochs,
        "pairs_train": pairs_train, "pairs_val": counts["pairs_val"],
        "fit_s": fit_time.get("s"), "run_total_s": total.seconds,
        "pairs_per_s_train_batches": ratio(trained_pairs, batch_s),
        "pairs_per_s_first_epoch": ratio(epochs[0]["pairs"], epochs[0]["seconds"]) if epochs else float("nan"),
        "pairs_per_s_later_epochs": (ratio(sum(e["pairs"] for e in epochs[1:]), sum(e["seconds"] for e in epochs[1:]))
                                     if len(epochs) > 1 else float("nan")),
        "pairs_per_s_fit": ratio(trained_pairs, fit_time.get("s", float("nan"))),
        "pairs_per_s_end_to_end": ratio(trained_pairs, total.seconds),
        "reward_key": stage1.BENCH_REWARD, "informative_pairs_with_task_reward": task_reward_pairs,
        "val_loss": result.get("loss"), "val_gain": result.get("gain"), "val_likelihood": result.get("likelihood"),
    }


def run(ctx: Context, cfg: Config) -> dict[str, Any]:
    from pipeline.importance import load

    load_before = load_average()
    dump_path = ctx.shared.get("stage1_dump")
    note = "dump from the stage-1 benchmark of this run"
    if dump_path is None:  # --only stage2: make a dump the same way, untimed
        stage1.run(ctx, stage1.Config(rounds=2, chunked=False, max_new_tokens=cfg.max_new_tokens))
        dump_path = ctx.shared["stage1_dump"]
        note = "dump made for this benchmark (2 paired rounds of the stage-1 setting)"
    training = train(ctx, dump_path, cfg)

    scorer = load(training["export"])
    backend = ctx.backend(cfg.gen_batch_size)
    params = SamplingParams(cfg.max_new_tokens, 1.0, 1.0)
    gen_prompts = prompts(ctx.tokenizer, cfg.gen_prompts, (0, 1))
    scorer.score([p.token_ids for p in gen_prompts], [[1, 2, 3]] * len(gen_prompts))  # warm-up
    samples = []
    for r in range(cfg.rounds):
        requests = [Request(p.token_ids, cfg.max_new_tokens, request_seed(100 + r, p.row["prompt_id"], 0, c))
                    for p in gen_prompts for c in range(cfg.group_size)]
        with Stopwatch() as gen:
            out = backend.generate(requests, params)
        completions = [c.token_ids for c in out]
        tokens = sum(len(c) for c in completions)
        with Stopwatch() as sco:
            scorer.score([q.prompt_ids for q in requests], completions, batch_size=cfg.score_batch_size)
        samples.append({"round": r, "completions": len(out), "completion_tokens": tokens,
                        "forwarded_tokens": tokens + sum(len(q.prompt_ids) for q in requests),
                        "generate_s": gen.seconds, "score_s": sco.seconds,
                        "generate_tokens_per_s": tokens / gen.seconds, "score_tokens_per_s": tokens / sco.seconds})
    per_round = [s["generate_s"] / s["score_s"] for s in samples]
    summary = {
        "config": asdict(cfg), "dump": str(dump_path), "dump_note": note, "training": training,
        "samples": samples, "completions_per_round": samples[0]["completions"],
        "score_tokens_per_s": median([s["score_tokens_per_s"] for s in samples]),
        "score_seconds": median([s["score_s"] for s in samples]),
        "generation_seconds": median([s["generate_s"] for s in samples]),
        "generation_tokens_per_s": median([s["generate_tokens_per_s"] for s in samples]),
        "prompt_tokens_per_completion_token": median([(s["forwarded_tokens"] - s["completion_tokens"])
                                                      / s["completion_tokens"] for s in samples]),
        "stage1_generation_tokens_per_s": ctx.shared.get("generation_tokens_per_s"),
        "ratio_per_round": per_round, "ratio_score_over_generation": median(per_round),
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    summary["checks"] = [Check("stage2 score / generation tokens/s", summary["ratio_score_over_generation"], TARGET,
                               ">=", f"median of {cfg.rounds} interleaved rounds").to_dict()]
    return summary


def rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    t, c = s["training"], s["config"]
    out = [("setting", f"frozen backbone, linear head, {c['max_epochs']} epochs, batch {c['batch_size']}; "
                       f"{t['pairs_train']} train / {t['pairs_val']} val pairs of reward_{t['reward_key']} "
                       f"({s['dump_note']}; the task reward leaves {t['informative_pairs_with_task_reward']})"),
           ("train: pairs/s, training batches (all epochs)", t["pairs_per_s_train_batches"]),
           ("train: pairs/s, epoch 1 (backbone forward + cache)", t["pairs_per_s_first_epoch"]),
           ("train: pairs/s, later epochs (cached features)", t["pairs_per_s_later_epochs"]),
           ("train: pairs/s over Trainer.fit (incl. validation)", t["pairs_per_s_fit"]),
           ("train: run() total s (load, fit, export, plots)", t["run_total_s"]),
           ("completions per round (generated, then scored)", s["completions_per_round"]),
           ("generation: median s / decoded tokens/s", f"{s['generation_seconds']:.2f} / "
                                                       f"{s['generation_tokens_per_s']:.1f}"),
           ("score: median s / completion tokens/s", f"{s['score_seconds']:.2f} / {s['score_tokens_per_s']:.1f}"),
           ("score: prompt tokens forwarded per completion token", s["prompt_tokens_per_completion_token"])]
    if s.get("stage1_generation_tokens_per_s"):
        out.append(("generation (stage-1 plain): decoded tokens/s", s["stage1_generation_tokens_per_s"]))
    out += [("score / generation tokens/s (median per round)", s["ratio_score_over_generation"]),
            ("per-round ratios", ", ".join(f"{x:.1f}" for x in s["ratio_per_round"])),
            ("load average before / after", f"{s['load_average_before']} / {s['load_average_after']}")]
    return out
