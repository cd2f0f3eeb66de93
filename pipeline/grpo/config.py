"""Stage-3 arguments: one dataclass, so the CLI (its defaults read from here), config files, checkpoints and
tests agree."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import samplers
from pipeline.credit_truth import TASK as CREDIT_TASK
from pipeline.errors import UserError
from pipeline.grpo.logprobs import DEFAULT_CHUNK_SIZE
from pipeline.grpo.softmask import NEEDS_F
from pipeline.models import DEFAULT_MODEL

NEEDS_IMPORTANCE = NEEDS_F  # the soft masks that read f, as registered (register_softmask(..., needs_f=True))
SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers.get_scheduler names
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IMPORTANCE_SOURCES = ("offline", "online", "oracle")
ONLINE_FEATURES = ("state+position", "context")  # the online head without a warm start: stage 2's token or context head
# Where and how a run runs, or how long and how often it reports: these may change on --resume, and they
# are not part of the default run name. Every other argument defines the run and must match on --resume.
RESUMABLE_ARGS = ("max_steps", "eval_every", "save_every", "save_total_limit", "logging_steps", "report_to",
                  "devices", "num_nodes", "strategy", "per_device_generation_batch_size", "backend",
                  "gpu_memory_utilization", "max_model_len", "dtype", "require_importance_gain",
                  "per_device_train_batch_size", "logprob_chunk_size", "entropy_every", "gradient_checkpointing",
                  "accelerator", "save_only_model")
LOCATION_ARGS = ("out_dir", "run_name", "resume")
TRUE_HALF = ("bf16-true", "16-true", "transformer-engine", "transformer-engine-float16")  # half-precision weights


def check_precision(precision: str, use_peft: bool) -> None:
    """The precision's name itself is checked by the CLI (Lightning's names)."""
    if precision in TRUE_HALF and not use_peft:
        raise UserError(f"--precision {precision} stores the trained weights in half precision, where AdamW's "
                        "updates at lr 1e-6 round away: use --precision bf16-mixed, or add --use_peft")


@dataclass
class GRPOArgs:
    model_name: str = DEFAULT_MODEL
    task_name: str = "arithmetic"
    importance_net: str | None = None
    softmask: str = "none"
    softmask_strength: float = 1.0
    entropy_quantile: float = 0.2
    sampler: str = "balanced"
    sampler_params: dict[str, Any] = field(default_factory=dict)
    levels: tuple[int, ...] = (0, 1)  # where the default model gets some reward (studies/cpu_arithmetic.yaml)
    num_train_prompts: int = 256
    eval_prompts: int = 8
    eval_temperature: float = 0.0  # 0: greedy
    prompts_per_step: int = 4
    group_size: int = 8
    max_steps: int = 50
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: str | dict[str, float] = ""  # name=weight,... (the CLI's) or a mapping; "": the task's
    reward_model: str | None = None
    rm_calibration_prompts: int = 16
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    importance_sampling_level: str = "token"
    lr: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 10
    save_every: int = 10
    save_total_limit: int = 2
    save_only_model: bool = False  # checkpoints without optimizer state: smaller, but they cannot be resumed
    logging_steps: int = 1
    report_to: tuple[str, ...] = ("csv",)
    backend: str = "hf"
    gpu_memory_utilization: float = 0.3  # colocated with training: leave the rest to the policy
    max_model_len: int | None = None
    dtype: str = "auto"
    per_device_generation_batch_size: int = 64  # rows per generate call of the hf backend
    seed: int = 0
    devices: str = "1"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    out_dir: str = "rollout_dump"
    run_name: str | None = None
    resume: bool = False
    require_importance_gain: bool = False
    per_device_train_batch_size: int | None = None  # completions per forward/backward (None: the whole step)
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # completion positions per LM-head chunk (0: all at once)
    entropy_every: int = 1  # log the policy's entropy every N steps (0: never)
    gradient_checkpointing: bool = False
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None  # comma-separated, or all-linear (default: peft's for the model)
    importance: str = "offline"  # where f comes from: the stage-2 net (offline) or a head on the policy (online)
    online_refit_every: int = 1  # 0: never refit, only judge (a warm-started head: docs/online_importance.md)
    online_buffer_size: int = 1024
    online_refit_iters: int = 25
    online_lr: float = 1e-2
    online_state_l2: float = 0.1
    online_heldout_fraction: float = 0.2
    online_min_heldout_prompts: int = 4
    online_likelihood: str = "auto"
    online_features: str = "state+position"  # ONLINE_FEATURES, without --importance_net (an export brings its own)
    accelerator: str = "auto"  # Fabric's: auto (CUDA when there), cpu, cuda/gpu; every model of the run follows it
    vllm_importance_sampling_correction: bool = True  # TRL 1.16's names and defaults; vLLM backend only
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0

    def identity(self) -> str:
        """Hash of what decides the run's results (not where/how it runs): the default run name."""
        data = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_ARGS + LOCATION_ARGS}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def warmup(self) -> int:
        """Warm-up steps: --warmup_steps, else --warmup_ratio of --max_steps rounded up (transformers' rule)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)


def changed_on_resume(saved: dict[str, Any], given: GRPOArgs) -> list[str]:
    """The defining arguments whose given value differs from the checkpoint's (absent ones are not compared)."""
    now = json.loads(json.dumps(asdict(given), default=str))
    before = json.loads(json.dumps(saved, default=str))
    return [k for k in now if k not in RESUMABLE_ARGS + LOCATION_ARGS and k in before and before[k] != now[k]]


def validate(args: GRPOArgs) -> None:
    """Checks across options and of names resolved at run time; each option's own range and choices are
    checked by the CLI's types (pipeline/cli.py)."""
    if args.importance == "online":
        _validate_online(args)
    elif args.importance == "oracle":
        _validate_oracle(args)
    elif args.softmask in NEEDS_IMPORTANCE and not args.importance_net:
        raise UserError(f"--softmask {args.softmask} needs --importance_net <stage-2 run>/export "
                        "(train one with train_importance_net.py), or --importance online")
    if args.importance_net and args.softmask not in NEEDS_IMPORTANCE:
        raise UserError(f"--importance_net is only used by --softmask {' or '.join(NEEDS_IMPORTANCE)} "
                        f"(got --softmask {args.softmask}): pick one of those or drop --importance_net")
    if args.warmup_steps and args.warmup_ratio:
        raise UserError("give --warmup_steps or --warmup_ratio, not both")
    if args.lr_scheduler_type == "constant" and args.warmup():
        raise UserError("--lr_scheduler_type constant has no warm-up: use constant_with_warmup, or drop "
                        "--warmup_steps/--warmup_ratio")
    if args.warmup() > args.max_steps:
        raise UserError(f"{args.warmup()} warm-up steps exceed --max_steps {args.max_steps}: lower the warm-up")
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if None not in (low, high) and low > high:
        raise UserError(f"--vllm_importance_sampling_clip_min {low} exceeds --vllm_importance_sampling_clip_max "
                        f"{high}: give a range")
    try:
        samplers.check_params(args.sampler, args.sampler_params)
    except ValueError as err:
        raise UserError(f"--sampler {args.sampler}: {err}") from err
    check_precision(args.precision, args.use_peft)
    if args.use_peft and "fsdp" in args.strategy:
        raise UserError("--use_peft with --strategy fsdp is not supported (LoRA checkpoints hold the adapter only, "
                        "which FSDP's sharded save does not): use --strategy ddp, LoRA's trainable state is small")


def _validate_oracle(args: GRPOArgs) -> None:
    """``--importance oracle`` is the credit task's true f: only that task has one."""
    if args.softmask not in NEEDS_IMPORTANCE:
        raise UserError(f"--importance oracle feeds the soft masks that read f ({', '.join(NEEDS_IMPORTANCE)}), "
                        f"not --softmask {args.softmask}")
    if args.task_name != CREDIT_TASK:
        raise UserError(f"--importance oracle is the true f of --task_name {CREDIT_TASK} (got '{args.task_name}'): "
                        "train on it, or use --importance offline/online")
    if args.importance_net:
        raise UserError("--importance oracle reads no net: drop --importance_net")


def _validate_online(args: GRPOArgs) -> None:
    """``--importance online``'s needs across options; its own options' ranges are the CLI's types."""
    if args.softmask not in NEEDS_IMPORTANCE:
        raise UserError(f"--importance online feeds the soft masks that read f ({', '.join(NEEDS_IMPORTANCE)}), "
                        f"not --softmask {args.softmask}")
    if args.group_size % 2:
        raise UserError(f"--importance online draws each group as sister pairs: --group_size must be even "
                        f"(got {args.group_size})")
    if not args.online_refit_every and not args.importance_net:
        raise UserError("--online_refit_every 0 never fits the online head: warm-start it with "
                        "--importance_net <stage-2 run>/export, or refit it (--online_refit_every 1)")
