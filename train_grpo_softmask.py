"""Stage 3: soft-masked GRPO under a curriculum sampler -> rollout_dump/<task>/<model>/grpo/<run>/."""

from __future__ import annotations

import click

from pipeline.cli import (
    ACCELERATOR,
    DEVICES,
    FRACTION,
    LEVELS,
    MAPPING,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    OPEN_UNIT_INTERVAL,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PRECISION,
    RUN_NAME,
    STRATEGY,
    UNIT_INTERVAL,
    backend_options,
    config_option,
    int_at_least,
    option,
    report_to_option,
    reward_model_options,
    run_stage,
    stage_command,
    task_name_help,
)
from pipeline.grpo.config import IMPORTANCE_SAMPLING_LEVELS, IMPORTANCE_SOURCES, LR_SCHEDULERS, SCALE_REWARDS
from pipeline.grpo.is_correction import IS_MODES
from pipeline.grpo.logprobs import DEFAULT_CHUNK_SIZE
from pipeline.grpo.losses import POLICY_LOSSES
from pipeline.grpo.softmask import SOFTMASKS
from pipeline.importance.loss import LIKELIHOODS
from pipeline.models import DEFAULT_MODEL
from pipeline.samplers import ALIASES, SAMPLERS


@stage_command()
@config_option
@option("model_name", default=DEFAULT_MODEL, help="Policy: alias, local HF directory or hub id.")
@option("task_name", default="countdown", help=task_name_help())
@option("importance_net", default=None,
        help="Stage-2 export directory (needed by delta/variance/shuffled; with --importance online, a warm start).")
@option("softmask", type=click.Choice(sorted(SOFTMASKS)), default="none")
@option("softmask_strength", type=UNIT_INTERVAL, default=1.0, help="lambda: 0 = uniform weights, 1 = full mask.")
@option("entropy_quantile", aliases=("top_entropy_quantile",), type=OPEN_UNIT_INTERVAL, default=0.2,
        help="entropy mode: share of tokens kept.")
@option("sampler", type=click.Choice([*SAMPLERS, *ALIASES]), default="balanced",
        help="Curriculum sampler (see docs/samplers.md).")
@option("sampler_params", type=MAPPING, default="", help="YAML mapping of sampler parameters.")
@option("levels", type=LEVELS, default="0,1,2,3", help="Training levels (eval adds the held-out one).")
@option("num_train_prompts", type=POSITIVE_INT, default=256)
@option("eval_prompts", type=POSITIVE_INT, default=8, help="Held-out prompts per level for greedy evaluation.")
@option("prompts_per_step", type=POSITIVE_INT, default=4)
@option("group_size", aliases=("num_generations",), type=int_at_least(2), default=8,
        help="Completions per prompt (advantages compare them).")
@option("max_steps", type=POSITIVE_INT, default=50)
@option("max_new_tokens", aliases=("max_completion_length",), type=POSITIVE_INT, default=128)
@option("temperature", type=POSITIVE_FLOAT, default=1.0)
@option("top_p", type=OPEN_UNIT_INTERVAL, default=1.0)
@option("rewards", default="", help="name=weight,... from rewards.py (default: the task's).")
@reward_model_options
@option("loss_type", type=click.Choice(sorted(POLICY_LOSSES)), default="dapo")
@option("importance_sampling_level", type=click.Choice(IMPORTANCE_SAMPLING_LEVELS), default="token",
        help="sequence: one length-normalised ratio per completion (GSPO).")
@option("scale_rewards", type=click.Choice(SCALE_REWARDS), default="group")
@option("epsilon", type=NON_NEGATIVE_FLOAT, default=0.2)
@option("epsilon_high", type=NON_NEGATIVE_FLOAT, default=None)
@option("beta", type=NON_NEGATIVE_FLOAT, default=0.0, help="k3 KL coefficient (0: no reference model).")
@option("num_iterations", type=POSITIVE_INT, default=1)
@option("mask_truncated_completions", is_flag=True, default=False)
@option("lr", aliases=("learning_rate",), type=NON_NEGATIVE_FLOAT, default=1e-6)
@option("lr_scheduler_type", type=click.Choice(LR_SCHEDULERS), default="linear",
        help="transformers.get_scheduler over --max_steps.")
@option("warmup_steps", type=NON_NEGATIVE_INT, default=0)
@option("warmup_ratio", type=UNIT_INTERVAL, default=0.0, help="Warm-up as a share of --max_steps (rounded up).")
@option("weight_decay", type=NON_NEGATIVE_FLOAT, default=0.0)
@option("max_grad_norm", type=POSITIVE_FLOAT, default=1.0)
@option("eval_every", type=POSITIVE_INT, default=10)
@option("save_every", type=POSITIVE_INT, default=10)
@option("save_total_limit", type=POSITIVE_INT, default=2, help="Newest checkpoints kept.")
@option("logging_steps", type=POSITIVE_INT, default=1, help="Steps per metrics row (the mean over those steps).")
@report_to_option
@backend_options(gpu_memory_utilization=0.3)
@option("batch_size", type=POSITIVE_INT, default=64, help="Generation micro-batch size.")
@option("seed", type=NON_NEGATIVE_INT, default=0)
@option("devices", type=DEVICES, default="1", help="Lightning devices: a count, auto, -1, or ids like 0,1.")
@option("num_nodes", type=POSITIVE_INT, default=1)
@option("strategy", type=STRATEGY, default="auto", help="Fabric strategy: auto, ddp, fsdp, ...")
@option("precision", type=PRECISION, default="32-true", help="Fabric precision; bf16-mixed on GPUs (bf16-true needs --use_peft).")
@option("out_dir", default="rollout_dump")
@option("run_name", type=RUN_NAME, default=None)
@option("resume", is_flag=True, default=False,
        help="Continue from the run's newest checkpoint (with the same defining options: README, stage 3).")
@option("require_importance_gain", is_flag=True, default=False,
        help="Refuse to start when the importance net's validation gain is not above 0 (its weights are noise).")
@option("per_device_train_batch_size", type=POSITIVE_INT, default=None,
        help="Completions per forward/backward; gradients accumulate over the step [default: the whole step].")
@option("logprob_chunk_size", type=NON_NEGATIVE_INT, default=DEFAULT_CHUNK_SIZE,
        help="Completion positions per LM-head chunk (0: all positions at once).")
@option("entropy_every", type=NON_NEGATIVE_INT, default=1, help="Log the policy's entropy every N steps (0: never).")
@option("gradient_checkpointing", is_flag=True, default=False, help="Recompute activations in backward.")
@option("use_peft", is_flag=True, default=False, help="Train a LoRA adapter instead of the whole policy.")
@option("lora_r", type=POSITIVE_INT, default=16)
@option("lora_alpha", type=POSITIVE_INT, default=32)
@option("lora_dropout", type=UNIT_INTERVAL, default=0.05)
@option("lora_target_modules", default=None, help="Comma-separated module names, or all-linear [default: peft's].")
@option("importance", type=click.Choice(IMPORTANCE_SOURCES), default="offline",
        help="f for delta/variance/shuffled: the stage-2 net (offline), or a head on the policy's own hidden states "
             "refit during the run on paired groups (online; --importance_net then only warm-starts it).")
@option("online_refit_every", type=POSITIVE_INT, default=1, help="online: steps between refits of the head.")
@option("online_buffer_size", type=int_at_least(2), default=1024, help="online: the most recent pairs the head is fit on.")
@option("online_refit_iters", type=POSITIVE_INT, default=25, help="online: full-batch AdamW steps per refit.")
@option("online_lr", type=POSITIVE_FLOAT, default=1e-2, help="online: the head's learning rate.")
@option("online_state_l2", type=NON_NEGATIVE_FLOAT, default=0.1,
        help="online: ridge penalty on the head's weights on hidden states (position weights are free).")
@option("online_heldout_fraction", type=FRACTION, default=0.2,
        help="online: share of prompts whose pairs only judge the head against the constant f.")
@option("online_likelihood", type=click.Choice(["auto", *LIKELIHOODS]), default="auto",
        help="online: the pair loss, as stage 2's --likelihood (auto: bernoulli for 0/1 rewards, else gaussian).")
@option("accelerator", type=ACCELERATOR, default="auto",
        help="Fabric accelerator: auto (CUDA when there), cpu, cuda; the reference, importance and reward models follow.")
@option("vllm_importance_sampling_correction", type=bool, default=True,
        help="Correct vLLM's sampling/training mismatch with its sampled-token log-probs (TRL 1.16).")
@option("vllm_importance_sampling_mode", type=click.Choice(IS_MODES), default="sequence_mask")
@option("vllm_importance_sampling_clip_min", type=NON_NEGATIVE_FLOAT, default=None, help="Lower bound C_min of the ratio.")
@option("vllm_importance_sampling_clip_max", type=POSITIVE_FLOAT, default=3.0, help="Upper bound C_max of the ratio.")
@run_stage
def main(**kwargs) -> None:
    """GRPO with per-token weights from the importance network, prompts drawn by a curriculum sampler."""
    from pipeline.grpo.config import GRPOArgs
    from pipeline.grpo.train import run

    run(GRPOArgs(**kwargs))


if __name__ == "__main__":
    main()
