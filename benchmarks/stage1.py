"""Stage 1: a paired dump against plain sampling of the same number of completions.

Same HFBackend (same model, batch size, sampling settings), same prompts. ``paired`` is
``sample_pairs`` (all sister As, the split, then the B continuations from prompt + A[:t], whose
prefix is prefill); ``plain`` is one ``backend.generate`` of G full requests per prompt with
distinct per-request seeds. Target (issue): paired / plain <= 1.10.

``paired_chunked`` (full run only) is the same paired sampling called chunk by chunk as
``pipeline.stage1.run`` does, in chunks of 4 prompts: half the CLI's default ``--prompts_per_chunk 8``
(4 was the default before this benchmark measured it), so it shows what chunks too small to fill a
generation batch cost next to one call over all prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import MODEL, TASK, Context, prompts
from benchmarks.timing import Check, Stopwatch, load_average, median, ratio, rounds
from pipeline import dump
from pipeline.generation.base import Request, SamplingParams
from pipeline.rollouts import (
    PairingConfig,
    generated_token_count,
    group_statistics,
    request_seed,
    sample_pairs,
    to_frame,
    to_table,
)
from pipeline.scoring import parse_reward_weights
from pipeline.tasks import default_rewards

TARGET = 1.10
BENCH_REWARD = "length"  # the reward column stage 2 fits, see write_dump


@dataclass
class Config:
    num_prompts: int = 8
    levels: tuple[int, ...] = (0, 1)
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    rounds: int = 3
    seed: int = 0
    chunked: bool = True  # also time chunked sampling (prompts_per_chunk prompts per sample_pairs call)
    prompts_per_chunk: int = 4


QUICK = Config(max_new_tokens=32, rounds=2, chunked=False)


def reward_weights() -> dict[str, float]:
    return parse_reward_weights(None, default_rewards(TASK))


def write_dump(ctx: Context, frames: list, group_size: int, max_new_tokens: int) -> Path:
    """The paired rounds as a stage-1 dump directory (one part file per round) for stage 2.

    Besides the task's rewards it holds ``reward_length`` (completion length / max_new_tokens, with
    its group statistics): the 135M model's task reward is constant in most groups at these
    lengths, which leaves stage 2 too few informative pairs to train on, while lengths vary in
    almost every group. Throughput does not depend on which reward column is fitted.
    """
    weights = reward_weights()
    names = [*weights, BENCH_REWARD]
    kv = {"model_name": MODEL, "task_name": TASK, "group_size": group_size, "reward_names": names,
          "reward_weights": weights, "tokenizer": dump.tokenizer_fingerprint(ctx.tokenizer)}
    schema = dump.schema_for(names, kv)
    path = ctx.workdir / "stage1" / "rollouts_bench"
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        frame = frame.copy()
        column = f"reward_{BENCH_REWARD}"
        frame[column] = frame["num_completion_tokens"] / max_new_tokens
        frame[f"{column}_group_mean"], frame[f"{column}_group_var"] = group_statistics(frame, column)
        dump.write_part(path / f"part-{i:05d}.parquet", to_table(frame, schema))
    return path


@contextmanager
def recording(backend, calls: list[dict[str, Any]]) -> Iterator[None]:
    """Record each ``backend.generate`` call (requests, seconds): sample_pairs makes two per call, A then B."""
    original = backend.generate

    def generate(requests, params):
        with Stopwatch() as sw:
            out = original(requests, params)
        calls.append({"requests": len(requests), "seconds": sw.seconds})
        return out

    backend.generate = generate
    try:
        yield
    finally:
        del backend.generate  # back to the class's method


def run(ctx: Context, cfg: Config) -> dict[str, Any]:
    tok = ctx.tokenizer
    backend = ctx.backend(cfg.batch_size)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    pairing = PairingConfig(group_size=cfg.group_size)
    weights = reward_weights()
    n = cfg.num_prompts
    # warm-up: first-call costs (allocator, kernels) are not the variants' fault
    warm = prompts(tok, 2, cfg.levels)
    backend.generate([Request(p.token_ids, 8, i) for i, p in enumerate(warm)], params)

    samples: list[dict[str, Any]] = []
    frames = []
    load_before = load_average()
    variants = ["paired", "plain"] + (["paired_chunked"] if cfg.chunked else [])
    for r, order in rounds(variants, cfg.rounds):
        seed = cfg.seed + r
        round_prompts = prompts(tok, n, cfg.levels, index_offset=r * n)  # distinct group ids per round
        for variant in order:
            if variant == "plain":
                requests = [Request(p.token_ids, cfg.max_new_tokens,
                                    request_seed(seed, p.row["prompt_id"], p.index, c))
                            for p in round_prompts for c in range(cfg.group_size)]
                with Stopwatch() as sw:
                    out = backend.generate(requests, params)
                lengths = [len(c.token_ids) for c in out]
                samples.append({"variant": variant, "round": r, "seconds": sw.seconds, "completions": len(out),
                                "completion_tokens": sum(lengths), "decoded_tokens": sum(lengths),
                                "max_len_hits": sum(c.finish_reason == "length" for c in out)})
                continue
            chunk = cfg.prompts_per_chunk if variant == "paired_chunked" else n
            records, calls = [], []
            with recording(backend, calls), Stopwatch() as sw:
                for c0 in range(0, n, chunk):
                    rng = np.random.default_rng([seed, c0])
                    records += sample_pairs(backend, round_prompts[c0:c0 + chunk], params, pairing, seed, rng)
            with Stopwatch() as sw_dump:  # what a dump adds after sampling: decode, rewards, group stats
                frame, _ = to_frame(records, tok, weights)
                table = to_table(frame, dump.schema_for(list(weights), {}))
            samples.append({"variant": variant, "round": r, "seconds": sw.seconds, "completions": len(frame),
                            "completion_tokens": int(frame["num_completion_tokens"].sum()),
                            "decoded_tokens": generated_token_count(frame),
                            "max_len_hits": int((frame["finish_reason"] == "length").sum()),
                            "degenerate_pairs": int(frame[frame["sister"] == 0]["degenerate"].sum()),
                            "frame_and_table_s": sw_dump.seconds, "rows": table.num_rows,
                            "sister_a_s": sum(c["seconds"] for c in calls[0::2]),
                            "sister_b_s": sum(c["seconds"] for c in calls[1::2]),
                            "generate_calls": [c["requests"] for c in calls]})
            if variant == "paired":
                frames.append(frame)

    dump_path = write_dump(ctx, frames, cfg.group_size, cfg.max_new_tokens)
    ctx.shared["stage1_dump"] = dump_path
    summary: dict[str, Any] = {"config": asdict(cfg), "samples": samples, "dump": str(dump_path),
                               "load_average_before": load_before, "load_average_after": load_average()}
    for variant in variants:
        rows = [s for s in samples if s["variant"] == variant]
        summary[variant] = {
            "median_s": median([s["seconds"] for s in rows]),
            "completions": rows[0]["completions"],
            "median_completion_tokens_per_s": median([s["completion_tokens"] / s["seconds"] for s in rows]),
            "median_decoded_tokens_per_s": median([s["decoded_tokens"] / s["seconds"] for s in rows]),
            "mean_completion_len": float(np.mean([s["completion_tokens"] / s["completions"] for s in rows])),
        }
        if variant != "plain":
            summary[variant] |= {"median_sister_a_s": median([s["sister_a_s"] for s in rows]),
                                 "median_sister_b_s": median([s["sister_b_s"] for s in rows]),
                                 "requests_per_generate_call": rows[0]["generate_calls"]}
    per_round = {}
    for variant in variants[1:]:
        key = "paired_over_plain" if variant == "plain" else "chunked_over_plain"
        num, den = ("paired", "plain") if variant == "plain" else ("paired_chunked", "plain")
        per_round[key] = [ratio(_t(samples, num, r), _t(samples, den, r)) for r in range(cfg.rounds)]
    summary["ratio_per_round"] = per_round
    summary["ratio_paired_over_plain"] = median(per_round["paired_over_plain"])
    summary["ratio_of_medians"] = ratio(summary["paired"]["median_s"], summary["plain"]["median_s"])
    summary["dump_overhead_s"] = median([s["frame_and_table_s"] for s in samples if s["variant"] == "paired"])
    if cfg.chunked:
        summary["ratio_chunked_over_plain"] = median(per_round["chunked_over_plain"])
    ctx.shared["generation_tokens_per_s"] = summary["plain"]["median_decoded_tokens_per_s"]
    summary["checks"] = [Check("stage1 paired / plain time", summary["ratio_paired_over_plain"], TARGET, "<=",
                               f"median of {cfg.rounds} interleaved rounds").to_dict()]
    return summary


def _t(samples: list[dict[str, Any]], variant: str, r: int) -> float:
    return next(s["seconds"] for s in samples if s["variant"] == variant and s["round"] == r)


def rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    c = s["config"]
    out = [("setting", f"{c['num_prompts']} prompts (levels {c['levels']}) x G={c['group_size']}, "
                       f"max_new_tokens {c['max_new_tokens']}, T={c['temperature']}, batch {c['batch_size']}, "
                       f"{c['rounds']} rounds")]
    for v in ("paired", "plain", "paired_chunked"):
        if v in s:
            out += [(f"{v}: median time (s)", s[v]["median_s"]),
                    (f"{v}: completion tokens/s", s[v]["median_completion_tokens_per_s"]),
                    (f"{v}: decoded tokens/s", s[v]["median_decoded_tokens_per_s"]),
                    (f"{v}: mean completion length", s[v]["mean_completion_len"])]
            if v != "plain":
                out.append((f"{v}: sister A / B phase s (requests per generate call)",
                             f"{s[v]['median_sister_a_s']:.2f} / {s[v]['median_sister_b_s']:.2f} "
                             f"({', '.join(map(str, s[v]['requests_per_generate_call']))})"))
    out += [("paired / plain (median of per-round ratios)", s["ratio_paired_over_plain"]),
            ("paired / plain (ratio of medians)", s["ratio_of_medians"]),
            ("per-round ratios", ", ".join(f"{x:.3f}" for x in s["ratio_per_round"]["paired_over_plain"]))]
    if "ratio_chunked_over_plain" in s:
        out.append(("paired in 4-prompt chunks / plain", s["ratio_chunked_over_plain"]))
    out += [("dump overhead after sampling (s, rewards+frame)", s["dump_overhead_s"]),
            ("load average before / after", f"{s['load_average_before']} / {s['load_average_after']}")]
    return out
