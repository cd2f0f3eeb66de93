"""Stage-3 arguments: one dataclass, so the CLI, config files, checkpoints and tests agree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.grpo.logprobs import DEFAULT_CHUNK_SIZE
from pipeline.grpo.losses import POLICY_LOSSES
from pipeline.grpo.policy import check_precision
from pipeline.grpo.softmask import SOFTMASKS

NEEDS_IMPORTANCE = ("delta", "variance", "shuffled")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOArgs:
    model_name: str
    task_name: str = "countdown"
    importance_net: str | None = None
    softmask: str = "none"
    softmask_strength: float = 1.0
    entropy_quantile: float = 0.2
    sampler: str = "balanced"
    sampler_params: dict[str, Any] = field(default_factory=dict)
    levels: tuple[int, ...] = (0, 1, 2, 3)
    num_train_prompts: int = 256
    eval_prompts: int = 8
    prompts_per_step: int = 4
    group_size: int = 8
    max_steps: int = 50
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: dict[str, float] = field(default_factory=dict)
    reward_model: str | None = None
    rm_calibration_prompts: int = 16
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 10
    save_every: int = 10
    backend: str = "hf"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3  # colocated with training: leave the rest to the policy
    max_model_len: int | None = None
    dtype: str = "auto"
    batch_size: int = 64
    seed: int = 0
    devices: str = "1"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    out_dir: str = "rollout_dump"
    run_name: str | None = None
    resume: bool = False
    require_importance_gain: bool = False
    report_to: tuple[str, ...] = ("csv",)
    per_device_train_batch_size: int | None = None  # completions per forward/backward (None: the whole step)
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # completion positions per LM-head chunk (0: all at once)
    entropy_every: int = 1  # log the policy's entropy every N steps (0: never)
    gradient_checkpointing: bool = False
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None  # comma-separated, or all-linear (default: peft's for the model)

    def identity(self) -> str:
        """Hash of what decides the run's results (not where/how it runs): the default run name."""
        skip = {"out_dir", "run_name", "resume", "devices", "num_nodes", "strategy", "batch_size", "backend",
                "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype",
                "require_importance_gain", "report_to",
                "per_device_train_batch_size", "logprob_chunk_size", "entropy_every", "gradient_checkpointing"}
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def validate(args: GRPOArgs) -> None:
    if args.group_size < 2:
        raise UserError(f"--group_size must be >= 2 (got {args.group_size}): advantages compare completions "
                        "of the same prompt")
    if args.softmask not in SOFTMASKS:
        raise UserError(f"unknown --softmask '{args.softmask}': choose one of {', '.join(SOFTMASKS)}")
    if args.softmask in NEEDS_IMPORTANCE and not args.importance_net:
        raise UserError(f"--softmask {args.softmask} needs --importance_net <stage-2 run>/export "
                        "(train one with train_importance_net.py)")
    if args.loss_type not in POLICY_LOSSES:
        raise UserError(f"unknown --loss_type '{args.loss_type}': choose one of {', '.join(POLICY_LOSSES)}")
    if args.scale_rewards not in SCALE_REWARDS:
        raise UserError(f"--scale_rewards must be one of {', '.join(SCALE_REWARDS)}")
    if not 0 <= args.softmask_strength <= 1 or not 0 < args.entropy_quantile <= 1:
        raise UserError("need 0 <= --softmask_strength <= 1 and 0 < --entropy_quantile <= 1")
    if args.max_steps < 1 or args.prompts_per_step < 1 or args.num_iterations < 1:
        raise UserError("--max_steps, --prompts_per_step and --num_iterations must be >= 1")
    if (args.per_device_train_batch_size or 1) < 1 or args.logprob_chunk_size < 0 or args.entropy_every < 0:
        raise UserError("need --per_device_train_batch_size >= 1, --logprob_chunk_size >= 0 (0: all at once) "
                        "and --entropy_every >= 0 (0: never)")
    if args.use_peft and (args.lora_r < 1 or args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1):
        raise UserError("--use_peft needs --lora_r >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1")
    check_precision(args.precision, args.use_peft)
