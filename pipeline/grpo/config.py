"""Stage-3 arguments: one dataclass, so the CLI, config files, checkpoints and tests agree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.grpo.is_correction import IS_MODES
from pipeline.grpo.losses import POLICY_LOSSES
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
    accelerator: str = "auto"  # Fabric's: auto (CUDA when there), cpu, cuda/gpu; every model of the run follows it
    vllm_importance_sampling_correction: bool = True  # TRL 1.16's names and defaults; vLLM backend only
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0

    def identity(self) -> str:
        """Hash of what decides the run's results (not where/how it runs): the default run name."""
        skip = {"out_dir", "run_name", "resume", "devices", "num_nodes", "strategy", "batch_size", "backend",
                "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype",
                "require_importance_gain", "report_to", "accelerator"}
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
    if args.tensor_parallel_size != 1:
        raise UserError("--tensor_parallel_size > 1 is for stage 1 only: stage 3 pushes the policy into one engine "
                        "per training process; use --tensor_parallel_size 1 (more GPUs: --devices)")
    if args.vllm_importance_sampling_mode not in IS_MODES:
        raise UserError(f"--vllm_importance_sampling_mode must be one of {', '.join(IS_MODES)}")
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if (low is not None and low < 0) or (high is not None and high <= 0) or (None not in (low, high) and low > high):
        raise UserError("need 0 <= --vllm_importance_sampling_clip_min <= --vllm_importance_sampling_clip_max, "
                        "clip_max > 0")
