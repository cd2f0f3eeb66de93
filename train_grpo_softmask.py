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
    RegistryChoice,
    backend_options,
    config_option,
    field_defaults,
    int_at_least,
    option,
    report_to_option,
    reward_model_options,
    run_stage,
    stage_command,
    switch,
    task_name_help,
)
from pipeline.grpo.config import (
    IMPORTANCE_SAMPLING_LEVELS,
    IMPORTANCE_SOURCES,
    LR_SCHEDULERS,
    ONLINE_FEATURES,
    SCALE_REWARDS,
    GRPOArgs,
)
from pipeline.grpo.is_correction import IS_MODES
from pipeline.grpo.losses import POLICY_LOSSES
from pipeline.grpo.softmask import NEEDS_ENTROPY, NEEDS_F, SOFTMASKS
from pipeline.importance.loss import LIKELIHOODS
from pipeline.samplers import ALIASES, SAMPLERS

DEFAULT = field_defaults(GRPOArgs)


@stage_command()
@config_option
@option("model_name", default=DEFAULT["model_name"], help="Policy: alias, local HF directory or hub id.")
@option("task_name", default=DEFAULT["task_name"], help=task_name_help())
@option("importance_net", default=DEFAULT["importance_net"],
        help="Stage-2 export directory (needed by delta/variance/shuffled; with --importance online, a warm start).")
@option("softmask", type=RegistryChoice(SOFTMASKS), default=DEFAULT["softmask"],
        help=f"Per-token loss weights (README, Soft masks): none is plain GRPO; {', '.join(NEEDS_F)} read f "
             f"(--importance_net, or --importance online); {', '.join(NEEDS_ENTROPY)} the policy's entropies.")
@option("softmask_strength", type=UNIT_INTERVAL, default=DEFAULT["softmask_strength"],
        help="lambda: 0 = uniform weights, 1 = full mask.")
@option("entropy_quantile", aliases=("top_entropy_quantile",), type=OPEN_UNIT_INTERVAL,
        default=DEFAULT["entropy_quantile"],
        help="entropy mode: share of tokens kept.")
@option("sampler", type=click.Choice([*SAMPLERS, *ALIASES]), default=DEFAULT["sampler"],
        help="Curriculum sampler (see docs/samplers.md).")
@option("sampler_params", type=MAPPING, default=DEFAULT["sampler_params"], help="YAML mapping of sampler parameters.")
@option("levels", type=LEVELS, default=DEFAULT["levels"], help="Training levels (eval adds the held-out one).")
@option("num_train_prompts", type=POSITIVE_INT, default=DEFAULT["num_train_prompts"],
        help="Training prompts, spread over --levels.")
@option("eval_prompts", type=POSITIVE_INT, default=DEFAULT["eval_prompts"],
        help="Held-out prompts per level for evaluation.")
@option("eval_temperature", type=NON_NEGATIVE_FLOAT, default=DEFAULT["eval_temperature"],
        help="Evaluation sampling temperature: 0 = greedy; > 0 samples one completion per prompt with a fixed seed.")
@option("prompts_per_step", type=POSITIVE_INT, default=DEFAULT["prompts_per_step"],
        help="Prompts per step, --group_size completions each (a multiple of the ranks).")
@option("group_size", aliases=("num_generations",), type=int_at_least(2), default=DEFAULT["group_size"],
        help="Completions per prompt (advantages compare them).")
@option("max_steps", type=POSITIVE_INT, default=DEFAULT["max_steps"],
        help="Training steps: one generation and optimizer step each.")
@option("max_new_tokens", aliases=("max_completion_length",), type=POSITIVE_INT, default=DEFAULT["max_new_tokens"],
        help="Most tokens per completion.")
@option("temperature", type=POSITIVE_FLOAT, default=DEFAULT["temperature"],
        help="Sampling temperature (the log-probs use it too).")
@option("top_p", type=OPEN_UNIT_INTERVAL, default=DEFAULT["top_p"], help="Nucleus sampling share (1: off).")
@option("rewards", default=DEFAULT["rewards"], help="name=weight,... from rewards.py (default: the task's).")
@reward_model_options
@option("loss_type", type=click.Choice(sorted(POLICY_LOSSES)), default=DEFAULT["loss_type"],
        help="Policy loss, as TRL's (pipeline/grpo/losses.py); cispo caps the ratio at --epsilon_high, which "
             "defaults to --epsilon (0.2): give e.g. --epsilon_high 5.0 with it.")
@option("importance_sampling_level", type=click.Choice(IMPORTANCE_SAMPLING_LEVELS),
        default=DEFAULT["importance_sampling_level"],
        help="sequence: one length-normalised ratio per completion (GSPO).")
@option("scale_rewards", type=click.Choice(SCALE_REWARDS), default=DEFAULT["scale_rewards"],
        help="Advantages divided by the group's reward std, the batch's, or not at all (none).")
@option("epsilon", type=NON_NEGATIVE_FLOAT, default=DEFAULT["epsilon"],
        help="Lower clip: the ratio is kept above 1 - epsilon.")
@option("epsilon_high", type=NON_NEGATIVE_FLOAT, default=DEFAULT["epsilon_high"],
        help="Upper clip: the ratio is kept below 1 + epsilon_high (DAPO: 0.28); with --loss_type cispo the "
             "ratio's absolute cap (TRL recommends 5.0) [default: --epsilon, so cispo caps at 0.2].")
@option("beta", type=NON_NEGATIVE_FLOAT, default=DEFAULT["beta"], help="k3 KL coefficient (0: no reference model).")
@option("num_iterations", type=POSITIVE_INT, default=DEFAULT["num_iterations"],
        help="Optimizer steps on each step's completions (TRL's mu; > 1 computes old log-probs).")
@option("mask_truncated_completions", is_flag=True, default=DEFAULT["mask_truncated_completions"],
        help="Leave completions cut at --max_new_tokens out of the loss (DAPO).")
@option("lr", aliases=("learning_rate",), type=NON_NEGATIVE_FLOAT, default=DEFAULT["lr"],
        help="AdamW's peak learning rate.")
@option("lr_scheduler_type", type=click.Choice(LR_SCHEDULERS), default=DEFAULT["lr_scheduler_type"],
        help="transformers.get_scheduler over --max_steps.")
@option("warmup_steps", type=NON_NEGATIVE_INT, default=DEFAULT["warmup_steps"],
        help="Warm-up steps of the LR schedule.")
@option("warmup_ratio", type=UNIT_INTERVAL, default=DEFAULT["warmup_ratio"],
        help="Warm-up as a share of --max_steps (rounded up).")
@option("weight_decay", type=NON_NEGATIVE_FLOAT, default=DEFAULT["weight_decay"], help="AdamW weight decay.")
@option("max_grad_norm", type=POSITIVE_FLOAT, default=DEFAULT["max_grad_norm"], help="Gradient-norm clipping.")
@option("eval_every", aliases=("eval_steps",), type=POSITIVE_INT, default=DEFAULT["eval_every"],
        help="Steps between greedy evaluations (also before training and at the end).")
@option("save_every", aliases=("save_steps",), type=POSITIVE_INT, default=DEFAULT["save_every"],
        help="Steps between checkpoints (also at the end).")
@option("save_total_limit", type=POSITIVE_INT, default=DEFAULT["save_total_limit"], help="Newest checkpoints kept.")
@option("save_only_model", is_flag=True, default=DEFAULT["save_only_model"],
        help="Checkpoints hold the policy, not the optimizer, scheduler, sampler and RNG states (transformers' "
             "save_only_model): smaller, but --resume refuses them (a preemption's checkpoint keeps them).")
@option("logging_steps", type=POSITIVE_INT, default=DEFAULT["logging_steps"],
        help="Steps per metrics row (the mean over those steps).")
@report_to_option(DEFAULT["report_to"])
@backend_options(gpu_memory_utilization=DEFAULT["gpu_memory_utilization"], tensor_parallel=False)
@option("per_device_generation_batch_size", deprecated=("batch_size",), type=POSITIVE_INT,
        default=DEFAULT["per_device_generation_batch_size"],
        help="Completions per generate call of the hf backend, on each device (vLLM batches itself).")
@option("seed", type=NON_NEGATIVE_INT, default=DEFAULT["seed"],
        help="Seeds the sampling, the curriculum sampler and torch's RNG (LoRA's init, shuffled's permutations).")
@option("devices", type=DEVICES, default=DEFAULT["devices"],
        help="Lightning devices: a count, auto, -1, or ids like 0,1.")
@option("num_nodes", type=POSITIVE_INT, default=DEFAULT["num_nodes"], help="Lightning nodes.")
@option("strategy", type=STRATEGY, default=DEFAULT["strategy"], help="Fabric strategy: auto, ddp, fsdp, ...")
@option("precision", type=PRECISION, default=DEFAULT["precision"],
        help="Fabric precision; bf16-mixed on GPUs (bf16-true needs --use_peft).")
@switch("bf16", "precision", "bf16-mixed", help="TRL's bf16: the same as --precision bf16-mixed.")
@switch("fp16", "precision", "16-mixed", help="TRL's fp16: the same as --precision 16-mixed.")
@option("out_dir", aliases=("output_dir",), default=DEFAULT["out_dir"],
        help="Root of the output tree: the run goes to <out_dir>/<task>/<model>/grpo/<run_name>.")
@option("run_name", type=RUN_NAME, default=DEFAULT["run_name"],
        help="Run directory under <out_dir>/<task>/<model>/grpo [default: <softmask>_<sampler>_<hash of the "
             "defining options>].")
@option("resume", is_flag=True, default=DEFAULT["resume"],
        help="Continue from the run's newest checkpoint (with the same defining options: README, stage 3).")
@option("require_importance_gain", is_flag=True, default=DEFAULT["require_importance_gain"],
        help="Refuse to start when the importance net's validation gain is not above 0 (its weights are noise).")
@option("per_device_train_batch_size", type=POSITIVE_INT, default=DEFAULT["per_device_train_batch_size"],
        help="Completions per forward/backward; gradients accumulate over the step [default: the whole step].")
@option("logprob_chunk_size", type=NON_NEGATIVE_INT, default=DEFAULT["logprob_chunk_size"],
        help="Completion positions per LM-head chunk (0: all positions at once).")
@option("entropy_every", type=NON_NEGATIVE_INT, default=DEFAULT["entropy_every"],
        help="Log the policy's entropy every N steps (0: never).")
@option("gradient_checkpointing", is_flag=True, default=DEFAULT["gradient_checkpointing"],
        help="Recompute activations in backward.")
@option("use_peft", is_flag=True, default=DEFAULT["use_peft"], help="Train a LoRA adapter instead of the whole policy.")
@option("lora_r", type=POSITIVE_INT, default=DEFAULT["lora_r"], help="LoRA rank (--use_peft).")
@option("lora_alpha", type=POSITIVE_INT, default=DEFAULT["lora_alpha"], help="LoRA alpha (--use_peft).")
@option("lora_dropout", type=UNIT_INTERVAL, default=DEFAULT["lora_dropout"], help="LoRA dropout (--use_peft).")
@option("lora_target_modules", default=DEFAULT["lora_target_modules"],
        help="Comma-separated module names, or all-linear [default: peft's].")
@option("importance", type=click.Choice(IMPORTANCE_SOURCES), default=DEFAULT["importance"],
        help="f for delta/variance/shuffled: the stage-2 net (offline), a head on the policy's own hidden states "
             "refit during the run on paired groups (online; --importance_net then only warm-starts it), or the "
             "task's true f (oracle; --task_name credit only).")
@option("online_refit_every", type=NON_NEGATIVE_INT, default=DEFAULT["online_refit_every"],
        help="online: steps between refits of the head; 0: never (a head warm-started by --importance_net, "
             "judged only).")
@option("online_buffer_size", type=int_at_least(2), default=DEFAULT["online_buffer_size"],
        help="online: the most recent pairs the head is fit on.")
@option("online_refit_iters", type=POSITIVE_INT, default=DEFAULT["online_refit_iters"],
        help="online: full-batch AdamW steps per refit.")
@option("online_lr", type=POSITIVE_FLOAT, default=DEFAULT["online_lr"], help="online: the head's learning rate.")
@option("online_state_l2", type=NON_NEGATIVE_FLOAT, default=DEFAULT["online_state_l2"],
        help="online: ridge penalty on the head's weights on hidden states (position weights are free).")
@option("online_heldout_fraction", type=FRACTION, default=DEFAULT["online_heldout_fraction"],
        help="online: share of prompts whose pairs only judge the head against the constant f.")
@option("online_min_heldout_prompts", type=int_at_least(2), default=DEFAULT["online_min_heldout_prompts"],
        help="online: held-out prompts the buffer needs before the head is judged (until then: uniform f).")
@option("online_likelihood", type=click.Choice(["auto", *LIKELIHOODS]), default=DEFAULT["online_likelihood"],
        help="online: the pair loss, as stage 2's --likelihood (auto: bernoulli on 0/1 prompts, else gaussian).")
@option("online_features", type=click.Choice(ONLINE_FEATURES), default=DEFAULT["online_features"],
        help="online: the head without --importance_net: stage 2's context head (an attention block over the "
             "policy's states of prompt + completion) or its token head (one token's state and position).")
@option("accelerator", type=ACCELERATOR, default=DEFAULT["accelerator"],
        help="Fabric accelerator: auto (CUDA when there), cpu, cuda; the reference, importance and reward models follow.")
@option("vllm_importance_sampling_correction", type=bool, default=DEFAULT["vllm_importance_sampling_correction"],
        help="Correct vLLM's sampling/training mismatch with its sampled-token log-probs (TRL 1.16).")
@option("vllm_importance_sampling_mode", type=click.Choice(IS_MODES), default=DEFAULT["vllm_importance_sampling_mode"],
        help="The ratio per token or per sequence, truncated at C_max or masked (zeroed) outside [C_min, C_max].")
@option("vllm_importance_sampling_clip_min", type=NON_NEGATIVE_FLOAT,
        default=DEFAULT["vllm_importance_sampling_clip_min"], help="Lower bound C_min of the ratio.")
@option("vllm_importance_sampling_clip_max", type=POSITIVE_FLOAT,
        default=DEFAULT["vllm_importance_sampling_clip_max"], help="Upper bound C_max of the ratio.")
@run_stage
def main(**kwargs) -> None:
    """GRPO with per-token weights from the importance network, prompts drawn by a curriculum sampler."""
    from pipeline.grpo.train import run

    run(GRPOArgs(**kwargs))


if __name__ == "__main__":
    main()
