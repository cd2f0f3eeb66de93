"""Stage 1 orchestration: resolve arguments, resume, generate chunk by chunk, write metadata."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import artifacts, dump
from pipeline.credit_truth import write_dump_truth
from pipeline.errors import UserError
from pipeline.generation import SamplingParams
from pipeline.generation.select import resolve_backend
from pipeline.hybrid_reward import check_hybrid_args, prepare_hybrid
from pipeline.models import load_tokenizer, model_slug, resolve_device
from pipeline.prompting import render_prompt
from pipeline.rollouts import PairingConfig, Prompt, generated_token_count, sample_pairs, to_frame, to_table
from pipeline.scoring import check_reward_arguments, parse_reward_weights, summarize_batches
from pipeline.tasks import build_rows, default_rewards, task_slug

log = logging.getLogger(__name__)
CONFIG_FILE = "run_config.json"


@dataclass
class Stage1Args:
    model_name: str
    task_name: str
    group_size: int = 8
    groups_per_prompt: int = 1
    num_prompts: int = 16
    levels: tuple[int, ...] = (0, 1, 2, 3)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    rewards: dict[str, float] = field(default_factory=dict)
    reward_model: str | None = None
    rm_calibration_prompts: int = 16
    split_quantile: float = 0.9
    max_split_tokens: int | None = None
    prompts_per_chunk: int = 8  # x G/2 sister-A requests: 8 x 4 fills a 32-row generation batch
    backend: str = "hf"
    per_device_generation_batch_size: int = 32
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    out_dir: str = "rollout_dump"
    tag: str | None = None
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    device: str = "auto"  # the hf backend's model and the hybrid reward model (vLLM places itself)

    def identity(self) -> dict[str, Any]:
        """The arguments that decide the dump's content: same identity -> same directory -> resume."""
        keys = ("model_name", "task_name", "group_size", "groups_per_prompt", "num_prompts", "levels",
                "max_new_tokens", "temperature", "top_p", "seed", "rewards", "reward_model", "split_quantile",
                "max_split_tokens", "prompts_per_chunk")
        return {k: getattr(self, k) for k in keys} | {"levels": list(self.levels)}


def validate(args: Stage1Args) -> None:
    """Checks across options (each option's own range is checked by the CLI's types)."""
    if args.group_size < 2 or args.group_size % 2:
        raise UserError(f"--group_size must be even and >= 2 (got {args.group_size}): a group is G/2 pairs")
    if not 0 <= args.shard_index < args.num_shards:
        raise UserError(f"--shard_index must be in [0, --num_shards) (got {args.shard_index} of {args.num_shards})")


def dump_dir(args: Stage1Args) -> Path:
    digest = hashlib.sha256(json.dumps(args.identity(), sort_keys=True).encode()).hexdigest()[:8]
    tag = args.tag or f"G{args.group_size}_n{args.num_prompts}_{digest}"
    return artifacts.stage_dir(args.out_dir, task_slug(args.task_name), model_slug(args.model_name)) / f"rollouts_{tag}"


def staging_dir(path: Path) -> Path:
    """Where ``--overwrite`` builds the new dump, beside the old one, until it is complete."""
    return path.with_name(f".{path.name}.overwrite")


def _same_arguments(work: Path, args: Stage1Args) -> bool | None:
    """None: no dump there yet; else whether the dump there was made with these arguments."""
    config_path = work / CONFIG_FILE
    if not config_path.exists():
        return None
    saved = artifacts.read_json(config_path, "pass --overwrite or another --tag")
    return saved == json.loads(json.dumps(args.identity()))


def check_work_dir(work: Path, args: Stage1Args) -> None:
    """Refuse to mix arguments in one dump, and parts that do not read (all before anything is written)."""
    if _same_arguments(work, args) is False and not args.overwrite:
        raise UserError(f"'{work}' holds a dump made with other arguments: pass --overwrite or another --tag")
    if _same_arguments(work, args):
        for part in sorted(work.glob("part-*.parquet")):
            dump.readable_part(part)


@contextmanager
def _publish_lock(staging: Path):
    """Held by one shard at a time; yields False when the staging directory is already gone (published)."""
    try:
        handle = open(staging / ".publish.lock", "a")  # noqa: SIM115 - held across the yield
    except FileNotFoundError:
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield staging.exists()


def publish(staging: Path, path: Path, num_chunks: int) -> bool:
    """Swap a finished ``--overwrite`` dump into place: the old dump is replaced only now, when every shard's
    chunks are written. Returns whether the new dump is in place (False: other shards still running)."""
    old = path.with_name(f".{path.name}.old")
    with _publish_lock(staging) as pending:
        if pending and len(list(staging.glob("part-*.parquet"))) < num_chunks:
            return False
        if pending:
            if old.exists() and path.exists():  # left by a swap that died after its first rename
                shutil.rmtree(old)
            if path.exists():
                path.rename(old)
            staging.rename(path)
            (path / ".publish.lock").unlink()
    shutil.rmtree(old, ignore_errors=True)
    return True


def _build_prompts(args: Stage1Args, tokenizer) -> list[Prompt]:
    prompts = []
    for index, row in enumerate(build_rows(args.task_name, args.num_prompts, args.levels)):
        text, ids = render_prompt(tokenizer, row)
        prompts.append(Prompt(index, row, text, ids))
    return prompts


def _make_backend(args: Stage1Args, tokenizer, device):
    from pipeline.generation.select import make_backend
    from pipeline.generation.vllm import VLLMOptions

    options = VLLMOptions(args.tensor_parallel_size, args.gpu_memory_utilization, args.max_model_len, args.dtype)
    return make_backend(args.backend, args.model_name, tokenizer, batch_size=args.per_device_generation_batch_size,
                        seed=args.seed, vllm=options, device=device)


def _metadata_name(args: Stage1Args) -> str:
    if args.num_shards == 1:
        return "rollouts_metadata.json"
    return f"rollouts_metadata.shard-{args.shard_index:03d}-of-{args.num_shards:03d}.json"


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts and reward statistics of a whole dump (all chunks, resumed or not)."""
    groups = frame.groupby("group_id")
    pairs = frame[frame["sister"] == 0]
    per_level = frame.groupby("level")["reward"].agg(["mean", "std", "count"])
    return {
        "prompts": int(frame["prompt_id"].nunique()),
        "groups": int(groups.ngroups),
        "completions": len(frame),
        "pairs": len(pairs),
        "degenerate_pairs": int(pairs["degenerate"].sum()),
        "zero_variance_groups": int((groups["reward_group_var"].first().fillna(0) <= 1e-12).sum()),
        "reward_failures": int(frame["reward"].isna().sum()),
        "mean_completion_tokens": float(frame["num_completion_tokens"].mean()),
        "truncated_fraction": float((frame["finish_reason"] == "length").mean()),
        "reward_by_level": {int(level): {k: float(v) for k, v in stats.items()} for level, stats in per_level.iterrows()},
    }


def run(args: Stage1Args) -> Path:
    """Every check (options, rewards, reward model, backend, tokenizer, model, existing dump) runs before
    anything is written; ``--overwrite`` builds the new dump aside and replaces the old one when it is complete."""
    validate(args)
    args.rewards = parse_reward_weights(args.rewards or None, default_rewards(args.task_name))
    check_hybrid_args(args.rewards, args.reward_model)
    args.backend = resolve_backend(args.backend)  # the metadata records which one ran
    device = resolve_device(args.device)
    args.device = str(device)  # the metadata records where it ran
    path = dump_dir(args)
    artifacts.check_writable(path)
    tokenizer = load_tokenizer(args.model_name)
    prompts = _build_prompts(args, tokenizer)
    check_reward_arguments(args.rewards, prompts[0].row)
    work = staging_dir(path) if args.overwrite else path
    check_work_dir(work, args)
    resuming = bool(_same_arguments(work, args))
    chunks = [prompts[i:i + args.prompts_per_chunk] for i in range(0, len(prompts), args.prompts_per_chunk)]
    mine = [c for c in range(len(chunks)) if c % args.num_shards == args.shard_index]
    if not mine:
        raise UserError(f"shard {args.shard_index} of {args.num_shards} has no chunk: the {len(prompts)} prompts "
                        f"make {len(chunks)} chunks of --prompts_per_chunk {args.prompts_per_chunk}; lower "
                        "--num_shards or --prompts_per_chunk")
    todo = [c for c in mine if not (resuming and (work / f"part-{c:05d}.parquet").exists())]
    metadata_path = work / _metadata_name(args)
    if not todo and metadata_path.exists():  # finished: its metadata describes the run that made it
        log.info("%s is complete: nothing to generate (pass --overwrite to start over)", work)
        metadata = artifacts.read_json(metadata_path, "delete it and rerun to write it again")
        if args.overwrite:
            publish(work, path, len(chunks))
        print_summary(path, metadata)
        return path
    backend = functools.cache(lambda: _make_backend(args, tokenizer, device))
    if todo:
        backend()  # the model loads before anything is written
    if args.overwrite and not resuming and work.exists():
        shutil.rmtree(work)  # scratch of an --overwrite attempt with other arguments
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
    hybrid = prepare_hybrid(args.rewards, args.reward_model, work / "hybrid_calibration.json", backend, tokenizer,
                            [(p.text, p.token_ids) for p in prompts], [p.row["question"] for p in prompts],
                            args.rm_calibration_prompts, params, args.seed, device=device) if todo else None
    artifacts.ensure_writable_dir(work)
    if not resuming:
        artifacts.write_json(work / CONFIG_FILE, args.identity())
    kv = {"model_name": args.model_name, "task_name": args.task_name, "group_size": args.group_size,
          "reward_names": list(args.rewards), "reward_weights": args.rewards,
          "tokenizer": dump.tokenizer_fingerprint(tokenizer)}
    schema = dump.schema_for(list(args.rewards), kv)
    pairing = PairingConfig(args.group_size, args.groups_per_prompt, args.split_quantile, args.max_split_tokens)
    started, t0 = artifacts.now_iso(), time.perf_counter()
    if len(todo) < len(mine):
        log.info("resuming %s: %d of %d chunks already written", work, len(mine) - len(todo), len(mine))
    generated_tokens, completions, scored = 0, 0, []
    bar = tqdm(todo, desc="chunks", unit="chunk")
    for c in bar:
        rng = np.random.default_rng([args.seed, c])
        records = sample_pairs(backend(), chunks[c], params, pairing, args.seed, rng)
        frame, batch = to_frame(records, tokenizer, args.rewards)
        scored.append(batch)
        dump.write_part(work / f"part-{c:05d}.parquet", to_table(frame, schema))
        completions += len(frame)
        generated_tokens += generated_token_count(frame)
        elapsed = time.perf_counter() - t0
        bar.set_postfix(completions_s=f"{completions / elapsed:.2f}", tok_s=f"{generated_tokens / elapsed:.1f}")
    runtime = time.perf_counter() - t0
    frame = dump.read_dump(work).to_pandas()
    counts = summarize(frame)
    truth = write_dump_truth(work, frame)  # the credit task's true f of each pair's prefix; None elsewhere
    reward_logs = summarize_batches(scored)
    metadata = {
        "arguments": asdict(args) | {"levels": list(args.levels)}, "output_dir": str(path),
        "started": started, "finished": artifacts.now_iso(), "runtime_s": round(runtime, 2),
        "chunks_generated_this_run": len(todo), "completions_this_run": completions,
        "generated_tokens_this_run": generated_tokens,
        "tokens_per_s": round(generated_tokens / runtime, 2) if todo else None,
        "reward_failures_this_run": reward_logs.pop("failures"), "reward_logs_this_run": reward_logs,
        "hybrid_reward": hybrid, "counts": counts, "true_f": truth, **artifacts.provenance(),
    }
    artifacts.write_json(metadata_path, metadata)
    if args.overwrite and not publish(work, path, len(chunks)):
        log.info("shard %d of %d done; the new dump replaces '%s' when every shard has finished",
                 args.shard_index, args.num_shards, path)
    print_summary(path, metadata)
    return path


def print_summary(path: Path, metadata: dict[str, Any]) -> None:
    c = metadata["counts"]
    levels = ", ".join(f"L{lv}: {s['mean']:.3f}" for lv, s in c["reward_by_level"].items())
    speed = f", {metadata['tokens_per_s']} tok/s" if metadata["tokens_per_s"] else ""
    log.info(
        "Wrote %d completions (%d prompts, %d groups, %d pairs) to %s in %.1f s%s. Mean reward by level: %s. "
        "Degenerate pairs: %d of %d; zero-variance groups: %d of %d; reward failures: %d. Metadata: %s",
        c["completions"], c["prompts"], c["groups"], c["pairs"], path, metadata["runtime_s"], speed, levels,
        c["degenerate_pairs"], c["pairs"], c["zero_variance_groups"], c["groups"], c["reward_failures"],
        path / ("rollouts_metadata.json" if metadata["arguments"]["num_shards"] == 1 else "rollouts_metadata.*.json"),
    )
