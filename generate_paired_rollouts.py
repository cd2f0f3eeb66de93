"""Stage 1: paired rollouts -> rollout_dump/<task>/<model>/rollouts_<tag>/ (parquet parts + metadata)."""

from __future__ import annotations

from pipeline.cli import (
    DIR_NAME,
    LEVELS,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    UNIT_INTERVAL,
    backend_options,
    config_option,
    int_at_least,
    option,
    reward_model_options,
    run_stage,
    stage_command,
    task_name_help,
)
from pipeline.models import DEFAULT_MODEL


@stage_command()
@config_option
@option("model_name", default=DEFAULT_MODEL, help="Alias, local HF directory or hub id.")
@option("task_name", default="countdown", help=task_name_help())
@option("group_size", aliases=("num_generations",), type=int_at_least(2), default=8,
        help="Completions per group (even: G/2 pairs).")
@option("groups_per_prompt", type=POSITIVE_INT, default=1, help="Groups per prompt (pooled statistics for stage 2).")
@option("num_prompts", type=POSITIVE_INT, default=16, help="Prompts, spread round-robin over --levels.")
@option("levels", type=LEVELS, default="0,1,2,3", help="Difficulty levels, comma-separated.")
@option("max_new_tokens", aliases=("max_completion_length",), type=POSITIVE_INT, default=128,
        help="Most tokens per completion.")
@option("temperature", type=NON_NEGATIVE_FLOAT, default=1.0, help="0 = greedy.")
@option("top_p", type=OPEN_UNIT_INTERVAL, default=1.0, help="Nucleus sampling share (1: off).")
@option("seed", type=NON_NEGATIVE_INT, default=0, help="Seeds every request's sampling and the split points.")
@option("rewards", default="", help="name=weight,... from rewards.py (default: the task's).")
@reward_model_options
@option("split_quantile", type=UNIT_INTERVAL, default=0.9, help="t ~ U{0..quantile of the prompt's other sister-A lengths}.")
@option("max_split_tokens", type=NON_NEGATIVE_INT, default=None, help="Fixed t_max instead of the quantile rule.")
@option("prompts_per_chunk", type=POSITIVE_INT, default=8,
        help="Prompts per written chunk (the unit of resume); keep prompts x groups x G/2 >= "
             "--per_device_generation_batch_size.")
@backend_options(gpu_memory_utilization=0.9)
@option("per_device_generation_batch_size", deprecated=("batch_size",), type=POSITIVE_INT, default=32,
        help="Completions per generate call of the hf backend (vLLM batches itself).")
@option("out_dir", default="rollout_dump",
        help="Root of the output tree: the dump goes to <out_dir>/<task>/<model>/rollouts_<tag>.")
@option("tag", type=DIR_NAME, default=None, help="Dump name (default: derived from the arguments).")
@option("shard_index", type=NON_NEGATIVE_INT, default=0, help="This job's shard of the chunks (0-based).")
@option("num_shards", type=POSITIVE_INT, default=1, help="Jobs the chunks are split across (a SLURM array).")
@option("overwrite", is_flag=True, default=False,
        help="Replace an existing dump with the same name: the new one is built aside and swapped in when complete.")
@option("device", default="auto", help="Where the hf backend and the reward model run: auto, cpu, cuda, cuda:N.")
@run_stage
def main(**kwargs) -> None:
    """Generate G/2 pairs per group of rollouts that share a prefix of t tokens, with rewards."""
    from pipeline.stage1 import Stage1Args, run

    run(Stage1Args(**kwargs))


if __name__ == "__main__":
    main()
