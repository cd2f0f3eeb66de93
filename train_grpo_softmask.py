"""Stage 3: soft-masked GRPO under a curriculum sampler -> rollout_dump/<task>/<model>/grpo/<run>/."""

from __future__ import annotations

import click
import yaml

from pipeline.cli import (
    backend_options,
    config_option,
    option,
    parse_levels,
    report_to_option,
    reward_model_options,
    run_stage,
    stage_command,
)
from pipeline.grpo.config import SCALE_REWARDS
from pipeline.grpo.is_correction import IS_MODES
from pipeline.grpo.losses import POLICY_LOSSES
from pipeline.grpo.softmask import SOFTMASKS
from pipeline.models import DEFAULT_MODEL


def _mapping(_ctx, _param, value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = yaml.safe_load(value) if value else {}
    except yaml.YAMLError as err:
        raise click.BadParameter("give a YAML/JSON mapping, e.g. '{sigma: 0.5, mu_exp: 0.5}'") from err
    if not isinstance(parsed, dict):
        raise click.BadParameter("give a YAML/JSON mapping, e.g. '{sigma: 0.5, mu_exp: 0.5}'")
    return parsed


@stage_command()
@config_option
@option("model_name", default=DEFAULT_MODEL, help="Policy: alias, local HF directory or hub id.")
@option("task_name", default="countdown", help="countdown, arithmetic, or a .jsonl/.parquet dataset path.")
@option("importance_net", default=None, help="Stage-2 export directory (needed by delta/variance).")
@option("softmask", type=click.Choice(sorted(SOFTMASKS)), default="none")
@option("softmask_strength", type=float, default=1.0, help="lambda: 0 = uniform weights, 1 = full mask.")
@option("entropy_quantile", type=float, default=0.2, help="entropy mode: share of tokens kept.")
@option("sampler", default="balanced", help="Curriculum sampler name (see docs/samplers.md).")
@option("sampler_params", default="", callback=_mapping, help="YAML mapping of sampler parameters.")
@option("levels", default="0,1,2,3", callback=parse_levels, help="Training levels (eval adds the held-out one).")
@option("num_train_prompts", type=int, default=256)
@option("eval_prompts", type=int, default=8, help="Held-out prompts per level for greedy evaluation.")
@option("prompts_per_step", type=int, default=4)
@option("group_size", type=int, default=8)
@option("max_steps", type=int, default=50)
@option("max_new_tokens", type=int, default=128)
@option("temperature", type=float, default=1.0)
@option("top_p", type=float, default=1.0)
@option("rewards", default="", help="name=weight,... from rewards.py (default: the task's).")
@reward_model_options
@option("loss_type", type=click.Choice(sorted(POLICY_LOSSES)), default="dapo")
@option("scale_rewards", type=click.Choice(SCALE_REWARDS), default="group")
@option("epsilon", type=float, default=0.2)
@option("epsilon_high", type=float, default=None)
@option("beta", type=float, default=0.0, help="k3 KL coefficient (0: no reference model).")
@option("num_iterations", type=int, default=1)
@option("mask_truncated_completions", is_flag=True, default=False)
@option("lr", type=float, default=1e-6)
@option("warmup_steps", type=int, default=0)
@option("weight_decay", type=float, default=0.0)
@option("max_grad_norm", type=float, default=1.0)
@option("eval_every", type=int, default=10)
@option("save_every", type=int, default=10)
@backend_options(gpu_memory_utilization=0.3)
@option("batch_size", type=int, default=64, help="Generation micro-batch size.")
@option("seed", type=int, default=0)
@option("devices", default="1")
@option("num_nodes", type=int, default=1)
@option("strategy", default="auto", help="Fabric strategy: auto, ddp, fsdp, ...")
@option("precision", default="32-true")
@option("out_dir", default="rollout_dump")
@option("run_name", default=None)
@option("resume", is_flag=True, default=False, help="Continue from the run's newest checkpoint.")
@option("require_importance_gain", is_flag=True, default=False,
        help="Refuse to start when the importance net's validation gain is not above 0 (its weights are noise).")
@report_to_option
@option("accelerator", default="auto", help="Fabric accelerator: auto (CUDA when there), cpu, cuda.")
@option("vllm_importance_sampling_correction", type=bool, default=True,
        help="Correct vLLM's sampling/training mismatch with its sampled-token log-probs (TRL 1.16).")
@option("vllm_importance_sampling_mode", type=click.Choice(IS_MODES), default="sequence_mask")
@option("vllm_importance_sampling_clip_min", type=float, default=None, help="Lower bound C_min of the ratio.")
@option("vllm_importance_sampling_clip_max", type=float, default=3.0, help="Upper bound C_max of the ratio.")
@run_stage
def main(**kwargs) -> None:
    """GRPO with per-token weights from the importance network, prompts drawn by a curriculum sampler."""
    from pipeline.grpo.config import GRPOArgs
    from pipeline.grpo.train import run

    run(GRPOArgs(**kwargs))


if __name__ == "__main__":
    main()
