"""Stage 3's pieces, each built by one function from the arguments; ``Trainer.__init__`` calls them in order.

The order is the run's: the checkpoint to continue is found before anything loads, and the generation
engine exists before the reward model loads for its calibration (vLLM sizes its memory share from what
is free).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import artifacts, samplers
from pipeline.cli import check_lightning
from pipeline.credit_truth import OracleImportance
from pipeline.errors import UserError
from pipeline.generation import SamplingParams
from pipeline.generation.base import GenerationBackend
from pipeline.generation.select import make_backend, resolve_backend
from pipeline.generation.vllm import VLLMOptions
from pipeline.grpo.checkpoints import check_resumable, checkpoint_metadata, latest_checkpoint
from pipeline.grpo.config import NEEDS_IMPORTANCE, RESUMABLE_ARGS, GRPOArgs, changed_on_resume, validate
from pipeline.grpo.distributed import gather_objects
from pipeline.grpo.fsdp import make_strategy
from pipeline.hybrid_reward import check_hybrid_args, prepare_hybrid
from pipeline.prompting import render_prompt
from pipeline.scoring import check_reward_arguments, parse_reward_weights
from pipeline.tasks import HELDOUT_LEVEL, build_rows, default_rewards, is_user_dataset
from pipeline.trackers import make_loggers

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from pipeline.importance.export import ImportanceScorer

log = logging.getLogger(__name__)

Row = dict[str, Any]
Prompt = tuple[str, list[int]]  # (text, token ids), as render_prompt gives it


def complete_args(args: GRPOArgs) -> None:
    """Check the arguments and fill in what the run's metadata records: the reward weights, the backend."""
    validate(args)
    args.rewards = parse_reward_weights(args.rewards or None, default_rewards(args.task_name))
    check_hybrid_args(args.rewards, args.reward_model)
    args.backend = resolve_backend(args.backend)  # the metadata records which one ran


def checkpoint_args(path: Path) -> dict[str, Any]:
    """The arguments a checkpoint was saved with, without reading its tensors (a sharded checkpoint is a
    directory whose meta.pt holds them)."""
    try:
        return checkpoint_metadata(path)["args"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"checkpoint '{path}' does not load ({type(err).__name__}): delete it to resume from the "
                        "one before, or pass a new --run_name") from err


def resume_from(run_dir: Path, args: GRPOArgs) -> Path | None:
    """The checkpoint to continue, checked before anything loads: a run without --resume never writes over
    one with checkpoints, and a resume must keep every defining argument."""
    artifacts.check_writable(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        if args.resume:
            log.info("--resume: no checkpoint in %s, starting fresh", run_dir)
        return None
    if not args.resume:
        raise UserError(f"'{run_dir}' already has checkpoints: pass --resume to continue it or --run_name for a "
                        "new run")
    saved = checkpoint_args(checkpoint)
    check_resumable(checkpoint)
    changed = changed_on_resume(saved, args)
    if changed:
        given = asdict(args)
        differences = ", ".join(f"--{k} ({saved[k]!r} in the checkpoint, {given[k]!r} given)" for k in changed)
        may_change = ", ".join(f"--{k}" for k in RESUMABLE_ARGS)
        raise UserError(f"--resume: {differences} differ from the run in '{run_dir}': resume with the run's values "
                        f"(only {may_change} may change), or pass a new --run_name")
    return checkpoint


def make_fabric(args: GRPOArgs, run_dir: Path) -> Fabric:
    """The run's Fabric with its trackers, not launched yet."""
    lightning = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
                 "precision": args.precision}
    check_lightning(quiet=True, strategy=args.strategy, **lightning)  # refusals name the strategy as given
    return check_lightning(strategy=make_strategy(args.strategy, args.model_name), **lightning,
                           loggers=make_loggers(args.report_to, run_dir, run_dir.name))


def launch(fabric: Fabric, prompts_per_step: int) -> None:
    """Start the ranks; each owns whole groups, so a step's prompts must split evenly between them."""
    fabric.launch()
    if prompts_per_step % fabric.world_size:
        raise UserError(f"--prompts_per_step {prompts_per_step} must be a multiple of the "
                        f"{fabric.world_size} ranks: each rank owns whole groups")


def load_importance(args: GRPOArgs, tokenizer: Any,
                    device: torch.device) -> OracleImportance | ImportanceScorer | None:
    """The fixed scorer of f on ``device``: the credit task's oracle or a stage-2 export of this tokenizer's
    model; None where the soft mask reads no f or the online head learns it during the run."""
    if args.softmask not in NEEDS_IMPORTANCE or args.importance == "online":
        return None
    if args.importance == "oracle":
        return OracleImportance().to(device)
    from pipeline import importance
    from pipeline.dump import tokenizer_fingerprint

    scorer = importance.load(args.importance_net)
    if scorer.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise UserError(f"importance net '{args.importance_net}' was trained with another tokenizer than "
                        f"'{args.model_name}': train it on a dump of this model")
    scorer.to(device)
    return scorer


def load_prompts(args: GRPOArgs, tokenizer: Any) -> tuple[list[Row], list[Prompt], list[Row], list[Prompt]]:
    """Training rows and prompts, then evaluation rows (every training level and the held-out one, unless
    the dataset is the user's) and prompts; the rows are checked to hold what the rewards read."""
    rows = build_rows(args.task_name, args.num_train_prompts, args.levels)
    eval_levels = list(args.levels) if is_user_dataset(args.task_name) else sorted({*args.levels, HELDOUT_LEVEL})
    eval_rows = build_rows(args.task_name, args.eval_prompts * len(eval_levels), eval_levels, split="eval")
    check_reward_arguments(args.rewards, rows[0])
    check_reward_arguments(["correct"], rows[0], fix="the evaluation checks answers with it: add an "
                           "`answer` or `solution` column")
    prompts = [render_prompt(tokenizer, row) for row in rows]
    return rows, prompts, eval_rows, [render_prompt(tokenizer, row) for row in eval_rows]


def build_sampler(args: GRPOArgs, rows: list[Row]) -> samplers.Sampler:
    """The curriculum sampler over the training rows, seeded with --seed."""
    try:
        return samplers.build(args.sampler, rows, batch_size=args.prompts_per_step, total_steps=args.max_steps,
                              seed=args.seed, **args.sampler_params)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"--sampler {args.sampler}: {err}") from err


def build_backend(args: GRPOArgs, tokenizer: Any, model: torch.nn.Module, device: torch.device) -> GenerationBackend:
    """The engine that samples the policy: the hf backend ``model`` itself (a full copy under FSDP), vLLM its
    own copy; the loop syncs a copy's weights after every optimizer step."""
    return make_backend(args.backend, args.model_name, tokenizer, model=model,
                        batch_size=args.per_device_generation_batch_size, seed=args.seed,
                        vllm=VLLMOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                                         max_model_len=args.max_model_len, dtype=args.dtype),
                        device=device)


def calibrate_reward_model(args: GRPOArgs, run_dir: Path, backend: GenerationBackend, tokenizer: Any,
                           rows: list[Row], prompts: list[Prompt], params: SamplingParams,
                           fabric: Fabric) -> dict[str, Any] | None:
    """The hybrid reward's warm-up, before the first step: the engine samples one completion for each of
    --rm_calibration_prompts prompts (shared between the ranks) and the reward model's score range over them
    fixes its scale, kept in the run directory for a rerun or resume. Its metadata; None without a hybrid reward."""
    return prepare_hybrid(args.rewards, args.reward_model, run_dir / "hybrid_calibration.json", lambda: backend,
                          tokenizer, prompts, [row["question"] for row in rows], args.rm_calibration_prompts,
                          params, args.seed, device=fabric.device, rank=fabric.global_rank,
                          world_size=fabric.world_size, gather=lambda obj: gather_objects(fabric, obj))
