"""Stage 3: the GRPO loop on Lightning Fabric, soft-masked, driven by a curriculum sampler.

Per step: sampler -> prompts -> G completions each -> rewards -> group advantages -> log-probs
(old/ref only when needed) -> soft-mask weights -> loss -> optimizer step -> sampler feedback.
Each rank owns whole groups; rewards are gathered so advantages, the dapo normaliser and every
rank's sampler state are global.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_scheduler

from pipeline import artifacts, samplers
from pipeline.cli import check_lightning
from pipeline.credit_truth import TASK as CREDIT_TASK
from pipeline.credit_truth import OracleImportance
from pipeline.credit_truth import step_metrics as credit_step_metrics
from pipeline.errors import UserError
from pipeline.generation import SamplingParams
from pipeline.generation.select import make_backend, resolve_backend
from pipeline.generation.vllm import VLLMOptions
from pipeline.grpo import online_importance
from pipeline.grpo.advantages import group_advantages, zero_std_fraction
from pipeline.grpo.checkpoints import (
    check_resumable,
    checkpoint_metadata,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.grpo.config import NEEDS_IMPORTANCE, RESUMABLE_ARGS, GRPOArgs, changed_on_resume, validate
from pipeline.grpo.distributed import gather_objects, global_token_metrics, interleave_groups, reduce_metrics
from pipeline.grpo.evaluation import evaluate
from pipeline.grpo.fsdp import make_strategy
from pipeline.grpo.importance_guard import check_importance_gain
from pipeline.grpo.is_correction import correction_metrics, importance_sampling_ratio, sampling_logprobs
from pipeline.grpo.losses import mask_truncated_completions
from pipeline.grpo.microbatch import PolicyBatch, accumulate, score
from pipeline.grpo.paired_rollout import collect_pairs
from pipeline.grpo.policy import (
    build_optimizer,
    build_policy,
    build_reference,
    checkpoint_entry,
    reference_model,
    save_policy,
    setup,
)
from pipeline.grpo.preemption import PreemptionFlag, requeue_slurm_job
from pipeline.grpo.reporting import RunTable, refresh_plots, window_mean
from pipeline.grpo.rollout import Experience, collect
from pipeline.grpo.softmask import NEEDS_ENTROPY, soft_mask_weights
from pipeline.hybrid_reward import check_hybrid_args, prepare_hybrid
from pipeline.models import load_tokenizer, model_slug
from pipeline.prompting import render_prompt
from pipeline.scoring import check_reward_arguments, parse_reward_weights
from pipeline.tasks import HELDOUT_LEVEL, build_rows, default_rewards, is_user_dataset, task_slug
from pipeline.trackers import make_loggers, numeric_only

log = logging.getLogger(__name__)


def run_dir_for(args: GRPOArgs) -> Path:
    name = args.run_name or f"{args.softmask}_{args.sampler}_{args.identity()}"
    return artifacts.stage_dir(args.out_dir, task_slug(args.task_name), model_slug(args.model_name)) / "grpo" / name


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


def make_scheduler(args: GRPOArgs, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule by name (TRL's default: linear), stepped once per training step over --max_steps."""
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup(),
                         num_training_steps=args.max_steps)


def _load_importance(args: GRPOArgs, tokenizer):
    if args.softmask not in NEEDS_IMPORTANCE or args.importance == "online":
        return None
    if args.importance == "oracle":
        return OracleImportance()
    from pipeline import importance
    from pipeline.dump import tokenizer_fingerprint

    scorer = importance.load(args.importance_net)
    if scorer.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise UserError(f"importance net '{args.importance_net}' was trained with another tokenizer than "
                        f"'{args.model_name}': train it on a dump of this model")
    return scorer


class Trainer:
    """Holds the run's objects; ``fit`` is the loop, each phase a short method."""

    def __init__(self, args: GRPOArgs):
        validate(args)
        args.rewards = parse_reward_weights(args.rewards or None, default_rewards(args.task_name))
        check_hybrid_args(args.rewards, args.reward_model)
        args.backend = resolve_backend(args.backend)  # the metadata records which one ran
        self.args = args
        self.run_dir = run_dir_for(args)
        self.checkpoint = resume_from(self.run_dir, args)
        lightning = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
                     "precision": args.precision}
        check_lightning(quiet=True, strategy=args.strategy, **lightning)  # refusals name the strategy as given
        self.fabric = check_lightning(strategy=make_strategy(args.strategy, args.model_name), **lightning,
                                      loggers=make_loggers(args.report_to, self.run_dir, self.run_dir.name))
        self.importance_check = (check_importance_gain(args.softmask, args.importance_net, args.require_importance_gain)
                                 if args.importance == "offline" else None)  # online: judged during the run
        self.fabric.launch()
        if args.prompts_per_step % self.fabric.world_size:
            raise UserError(f"--prompts_per_step {args.prompts_per_step} must be a multiple of the "
                            f"{self.fabric.world_size} ranks: each rank owns whole groups")
        self.tokenizer = load_tokenizer(args.model_name)
        self.importance = _load_importance(args, self.tokenizer)
        self.rows = build_rows(args.task_name, args.num_train_prompts, args.levels)
        eval_levels = list(args.levels) if is_user_dataset(args.task_name) else sorted({*args.levels, HELDOUT_LEVEL})
        self.eval_rows = build_rows(args.task_name, args.eval_prompts * len(eval_levels), eval_levels, split="eval")
        check_reward_arguments(args.rewards, self.rows[0])
        check_reward_arguments(["correct"], self.rows[0], fix="the evaluation checks answers with it: add an "
                               "`answer` or `solution` column")
        self.prompts = [render_prompt(self.tokenizer, row) for row in self.rows]
        self.eval_prompts = [render_prompt(self.tokenizer, row) for row in self.eval_rows]
        try:
            self.sampler = samplers.build(args.sampler, self.rows, batch_size=args.prompts_per_step,
                                          total_steps=args.max_steps, seed=args.seed, **args.sampler_params)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"--sampler {args.sampler}: {err}") from err
        torch.manual_seed(args.seed)
        self.policy = build_policy(args)
        self.reference = build_reference(args)  # None with LoRA: the policy with adapters disabled
        optimizer = build_optimizer(self.policy, args)
        self.scheduler = make_scheduler(args, optimizer)
        self.model, self.optimizer = setup(self.fabric, self.policy, optimizer)
        if self.reference is not None:
            self.reference = self.fabric.to_device(self.reference)
        if self.importance is not None:
            self.importance.to(self.fabric.device)
        self.online: online_importance.OnlineImportance | None = None
        if args.importance == "online":
            self.online = online_importance.from_args(args, self.policy.config.hidden_size, self.tokenizer,
                                                      self.fabric.device)
        self.backend = make_backend(args.backend, args.model_name, self.tokenizer, model=self.model,
                                    batch_size=args.per_device_generation_batch_size, seed=args.seed,
                                    vllm=VLLMOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                                                     max_model_len=args.max_model_len, dtype=args.dtype),
                                    device=self.fabric.device)
        self.params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
        self.step = 0
        self.hybrid = prepare_hybrid(args.rewards, args.reward_model, self.run_dir / "hybrid_calibration.json",
                                     lambda: self.backend, self.tokenizer, self.prompts,
                                     [row["question"] for row in self.rows], args.rm_calibration_prompts,
                                     self.params, args.seed, device=self.fabric.device,
                                     rank=self.fabric.global_rank, world_size=self.fabric.world_size,
                                     gather=lambda obj: gather_objects(self.fabric, obj))

    # ---- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {"policy": checkpoint_entry(self.model, self.args.use_peft), "optimizer": self.optimizer,
                 "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state(),
                 "step": self.step, "args": asdict(self.args)}
        if self.online is not None:
            state["online"] = self.online  # the head, its optimizer, the pair buffer, the fallback switch
        return state

    def save(self, resumable: bool = False) -> Path:
        """``resumable``: the whole state even under --save_only_model (a preemption's checkpoint)."""
        return save_checkpoint(self.fabric, self.run_dir / "checkpoints", self.step, self._state(),
                               self.args.save_total_limit, before_publish=self._flush_tables,
                               only_model=self.args.save_only_model and not resumable)

    def _flush_tables(self) -> None:
        """Rank 0, before a checkpoint appears: a checkpoint never lacks the rows up to its step."""
        for table in self.tables.values():
            table.flush()
        for logger in self.fabric.loggers:
            logger.save()

    def restore(self, path: Path) -> None:
        state = self._state()
        self.fabric.load(path, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.backend.sync_weights(self.model)  # the engine was built from the base weights
        log.info("resumed from %s at step %d", path, self.step)

    # ---- one step ----------------------------------------------------------------------------
    def _my_share(self, indices: list[int]) -> list[int]:
        return indices[self.fabric.global_rank::self.fabric.world_size]

    def _gather_rewards(self, local: np.ndarray) -> np.ndarray:
        """Rewards of every rank's groups, in the sampler's prompt order."""
        world, group = self.fabric.world_size, self.args.group_size
        if world == 1:
            return local
        gathered = self.fabric.all_gather(torch.as_tensor(local, dtype=torch.float64)).cpu().numpy()
        per_rank = gathered.reshape(world, -1, group)  # (rank, prompt k, G); global prompt = rank + world*k
        return per_rank.transpose(1, 0, 2).reshape(-1)

    def _check_sampler_agreement(self) -> str:
        """Every rank fed its sampler the same gathered rewards: fail loudly if the states differ."""
        sha = hashlib.sha256(json.dumps(self.sampler.state_dict(), sort_keys=True).encode()).hexdigest()[:12]
        if self.fabric.world_size > 1:
            mine = torch.tensor([int(sha, 16)], dtype=torch.int64, device=self.fabric.device)
            if not torch.all(self.fabric.all_gather(mine) == mine):
                raise RuntimeError(f"sampler states diverged across ranks at step {self.step}")
        return sha

    def _weights(self, exp: Experience, mask: torch.Tensor, entropies: torch.Tensor | None,
                 answers: list[str]) -> torch.Tensor:
        f = None
        if isinstance(self.importance, OracleImportance):
            f = self.importance.score_padded(answers, exp.texts, exp.completion_mask.sum(1).long().tolist(),
                                             width=exp.completion_len).to(mask.device)
        elif self.importance is not None:
            with self.fabric.autocast():
                f = self.importance.score_padded(exp.prompt_ids, [c.token_ids for c in exp.completions],
                                                 width=exp.completion_len).to(mask.device)
        return soft_mask_weights(self.args.softmask, mask, self.args.softmask_strength, f=f,
                                 entropies=entropies, entropy_quantile=self.args.entropy_quantile)

    def _sampled_logprobs(self, exp: Experience) -> torch.Tensor | None:
        """vLLM's log-probs of its own samples when the correction is on (the hf backend samples the policy: None)."""
        if not self.args.vllm_importance_sampling_correction:
            return None
        sampled = sampling_logprobs(exp.completions, exp.completion_len)
        return None if sampled is None else sampled.to(self.fabric.device)

    def training_step(self, indices: list[int]) -> dict[str, Any]:
        args, fabric = self.args, self.fabric
        mine = self._my_share(indices)
        t0 = time.perf_counter()
        sampling = (self.backend, self.tokenizer, [self.rows[i] for i in mine], [self.prompts[i] for i in mine],
                    args.group_size, self.params, args.rewards, args.seed, self.step, args.max_steps)
        exp, pairing = (collect(*sampling), None) if self.online is None else collect_pairs(
            *sampling, self.online.split_limit(args.max_new_tokens))
        t_gen = time.perf_counter() - t0
        all_rewards = self._gather_rewards(exp.rewards)
        rank = fabric.global_rank
        advantages_all = group_advantages(torch.as_tensor(all_rewards, dtype=torch.float32), args.group_size,
                                          args.scale_rewards)
        local_rows = np.concatenate([np.arange(g * args.group_size, (g + 1) * args.group_size)
                                     for g in range(rank, len(indices), fabric.world_size)])
        advantages = advantages_all[local_rows].to(fabric.device)
        input_ids, attention = exp.input_ids.to(fabric.device), exp.attention_mask.to(fabric.device)
        mask = exp.completion_mask.to(fabric.device)
        if args.mask_truncated_completions:
            mask = mask_truncated_completions(mask, exp.truncated.to(fabric.device))
        num_items = fabric.all_reduce(mask.sum(), reduce_op="sum") / fabric.world_size
        batch = PolicyBatch(input_ids, attention, mask, advantages)
        size, chunk = args.per_device_train_batch_size, args.logprob_chunk_size
        sampled = self._sampled_logprobs(exp)
        if args.num_iterations > 1 or sampled is not None:
            batch.old_logps, _ = score(self.model, batch, size, args.temperature, chunk_size=chunk)
        if sampled is not None:
            batch.is_ratio = importance_sampling_ratio(batch.old_logps, sampled, mask,
                                                       args.vllm_importance_sampling_mode,
                                                       args.vllm_importance_sampling_clip_min,
                                                       args.vllm_importance_sampling_clip_max)
        if args.beta:
            with reference_model(self.model, self.reference) as reference, fabric.autocast():
                batch.ref_logps, _ = score(reference, batch, size, args.temperature, chunk_size=chunk)

        answers = [str(self.rows[i].get("answer")) for i in mine for _ in range(args.group_size)]

        def entropy_mask(entropies: torch.Tensor) -> torch.Tensor:
            return self._weights(exp, mask, entropies, answers)

        online_hook = None
        if self.online is not None:
            online_hook = self.online.weights_hook(args.softmask, args.softmask_strength, mask,
                                                   exp.completion_mask.sum(1).long().to(fabric.device), pairing)
        elif args.softmask not in NEEDS_ENTROPY:
            batch.weights = self._weights(exp, mask, None, answers)
        log_entropy = args.entropy_every > 0 and (self.step + 1) % args.entropy_every == 0
        loss_options = {"beta": args.beta, "epsilon_low": args.epsilon, "epsilon_high": args.epsilon_high,
                        "importance_sampling_level": args.importance_sampling_level,
                        "max_completion_length": args.max_new_tokens, "num_items_in_batch": num_items}
        for _ in range(args.num_iterations):
            result = accumulate(fabric, self.model, batch, args.loss_type, loss_options, size, args.temperature,
                                with_entropy=log_entropy, chunk_size=chunk,
                                weights_from_entropies=entropy_mask if args.softmask in NEEDS_ENTROPY else None,
                                weights_from_states=online_hook)
            if online_hook is not None:  # later iterations keep the first forward's weights
                batch.weights, online_hook = result.weights, None
            grad_norm = fabric.clip_gradients(self.model, self.optimizer, max_norm=args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        weights, entropies = result.weights, result.entropies
        credit = {} if args.task_name != CREDIT_TASK else credit_step_metrics(
            answers, exp.texts, mask if weights is None else weights, mask,
            None if self.online is None else self.online.step_curves())
        self.scheduler.step()
        self.backend.sync_weights(self.model)
        logged = {"loss": result.loss, **result.metrics}  # global values: this rank's shard averaged over ranks
        if sampled is not None:
            logged.update(correction_metrics(batch.old_logps, sampled, mask, batch.is_ratio))
        logged = reduce_metrics(fabric, logged)
        online_metrics = {} if self.online is None else self.online.end_step(
            self.step + 1, [self.rows[i]["prompt_id"] for i in mine for _ in range(args.group_size)], exp.rewards,
            pairing, mask, None if fabric.world_size == 1 else lambda t: fabric.all_gather(t).flatten(0, 1))
        per_prompt = np.nanmean(all_rewards.reshape(-1, args.group_size), axis=1)
        scored = np.isfinite(per_prompt)  # a prompt none of whose completions got a reward teaches nothing
        self.sampler.update([i for i, ok in zip(indices, scored, strict=True) if ok], per_prompt[scored].tolist())
        sampler_sha = self._check_sampler_agreement()
        elapsed = time.perf_counter() - t0
        levels = np.array([self.rows[i]["level"] for i in indices for _ in range(args.group_size)])
        metrics = {
            **exp.reward_metrics,
            "step": self.step + 1, "reward_mean": float(np.nanmean(all_rewards)),
            "reward_std": float(np.nanstd(all_rewards)),
            "frac_zero_std_groups": zero_std_fraction(torch.as_tensor(all_rewards), args.group_size),
            "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "completion_len": float(exp.completion_mask.sum(1).mean()),
            "truncated_frac": float(exp.truncated.float().mean()),
            "tokens_per_s": float(exp.completion_mask.sum() / t_gen), "step_time_s": elapsed,
            "generation_time_s": t_gen, "reward_failures": sum(exp.failures.values()), "sampler_sha": sampler_sha,
            **{f"reward_mean/level_{lv}": float(np.nanmean(all_rewards[levels == lv])) for lv in sorted(set(levels))},
            **{f"reward/{name}": float(np.nanmean(v)) for name, v in exp.per_function.items()},
            **logged,
            **global_token_metrics(fabric, mask, entropies, weights),  # entropy, weights/*
            **online_metrics,
            **credit,
            **{f"sampler/{k}": float(v) for k, v in self.sampler.probabilities().items()},
        }
        samples = [{**{column: values[i] for column, values in exp.reward_extra.items() if len(values) == len(exp.texts)},
                    "step": self.step + 1, "prompt_id": self.rows[mine[i // args.group_size]]["prompt_id"],
                    "level": self.rows[mine[i // args.group_size]]["level"],
                    "prompt": self.prompts[mine[i // args.group_size]][0], "completion": exp.texts[i],
                    "reward": float(exp.rewards[i]), "advantage": float(advantages[i]),
                    **{f"reward_{n}": float(v[i]) for n, v in exp.per_function.items()}}
                   for i in range(len(exp.texts))]
        return {"metrics": metrics, "samples": interleave_groups(gather_objects(fabric, samples), args.group_size)}

    # ---- the loop ----------------------------------------------------------------------------
    def _evaluate(self) -> None:
        fabric = self.fabric
        rows = evaluate(self.backend, self.tokenizer, self.eval_rows, self.eval_prompts, self.args.max_new_tokens,
                        fabric.global_rank, fabric.world_size, gather=lambda obj: gather_objects(fabric, obj),
                        temperature=self.args.eval_temperature)
        self.tables["eval"].extend([{"step": self.step, **row} for row in rows])
        self.fabric.log_dict({f"eval/{key}/level_{row['level']}": row[key] for row in rows
                              for key in ("accuracy", "mean_length")}, step=self.step)
        if self.fabric.is_global_zero:
            refresh_plots(self.tables["metrics"].frame(), self.tables["eval"].frame(), self.run_dir)
        log.info("eval step %d: %s", self.step, ", ".join(f"L{r['level']} {r['accuracy']:.2f}" for r in rows))

    def fit(self) -> Path:
        args, fabric = self.args, self.fabric
        checkpoint = self.checkpoint
        if checkpoint is not None:
            self.restore(checkpoint)
        if fabric.is_global_zero:
            artifacts.ensure_writable_dir(self.run_dir / "checkpoints")
        resume_step = self.step if checkpoint is not None else None
        self.tables = {name: RunTable(self.run_dir / file, resume_step) for name, file in
                       (("metrics", "metrics.csv"), ("eval", "eval.csv"), ("samples", "samples.parquet"))}
        started, t0 = artifacts.now_iso(), time.perf_counter()
        for logger in fabric.loggers:
            logger.log_hyperparams(asdict(args))
        preempted = PreemptionFlag()
        if self.step == 0:
            self._evaluate()
        bar = tqdm(range(self.step, args.max_steps), initial=self.step, total=args.max_steps, desc="grpo",
                   disable=not fabric.is_global_zero)
        window: list[dict[str, Any]] = []  # metrics of the steps since the last logged row
        for _ in bar:
            out = self.training_step(self.sampler.next_batch())
            self.step += 1
            window.append(out["metrics"])
            self.tables["samples"].extend(out["samples"])
            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                row = window_mean(window)
                window = []
                self.tables["metrics"].extend([row])
                fabric.log_dict(numeric_only(row), step=self.step)
                if fabric.is_global_zero:
                    self.tables["metrics"].flush()
            m = out["metrics"]
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if self.step % args.eval_every == 0 or self.step == args.max_steps:
                self._evaluate()
            if self.step % args.save_every == 0 or self.step == args.max_steps:
                self.save()
            stop = fabric.all_reduce(torch.tensor(float(bool(preempted)), device=fabric.device), reduce_op="max")
            if stop.item() > 0:
                path = self.save(resumable=True)
                log.info("signal %s: saved %s at step %d; requeueing", preempted.received, path, self.step)
                code = requeue_slurm_job() if fabric.is_global_zero else 0
                sys.exit(fabric.broadcast(code))
        return self.finish(started, time.perf_counter() - t0)

    def finish(self, started: str, runtime: float) -> Path:
        save_policy(self.model, self.tokenizer, self.run_dir / "policy", self.fabric.is_global_zero)
        if not self.fabric.is_global_zero:
            return self.run_dir
        metrics, evals = self.tables["metrics"].frame(), self.tables["eval"].frame()
        for table in self.tables.values():
            table.flush()
        refresh_plots(metrics, evals, self.run_dir)
        final_eval = evals[evals["step"] == evals["step"].max()] if not evals.empty else evals
        metadata = {"arguments": asdict(self.args), "run_dir": str(self.run_dir), "started": started,
                    "finished": artifacts.now_iso(), "runtime_s_this_process": round(runtime, 2),
                    "steps": self.step, "hybrid_reward": self.hybrid, "final_eval": final_eval.to_dict("records"),
                    "importance_check": self.importance_check,
                    "final_metrics": metrics.iloc[-1].to_dict() if not metrics.empty else {},
                    **artifacts.provenance()}
        artifacts.write_json(self.run_dir / "metadata.json", metadata)
        for logger in self.fabric.loggers:
            logger.finalize("success")
        acc = ", ".join(f"L{r['level']} {r['accuracy']:.2f}" for r in metadata["final_eval"])
        log.info("GRPO done: %d steps in %.1f s; final reward %.3f; eval accuracy %s. Wrote %s "
                 "(policy/, checkpoints/, metrics.csv, eval.csv, samples.parquet, learning_curve.png, "
                 "curriculum.png, metadata.json)", self.step, runtime,
                 metadata["final_metrics"].get("reward_mean", float("nan")), acc, self.run_dir)
        return self.run_dir


def run(args: GRPOArgs) -> Path:
    return Trainer(args).fit()

