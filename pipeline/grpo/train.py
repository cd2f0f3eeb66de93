"""Stage 3: the GRPO loop on Lightning Fabric, soft-masked, driven by a curriculum sampler.

Per step: sampler -> prompts -> G completions each -> rewards -> group advantages -> log-probs
(old/ref only when needed) -> soft-mask weights -> loss -> optimizer step -> sampler feedback.
Each rank owns whole groups; rewards are gathered so advantages, the dapo normaliser and every
rank's sampler state are global. ``Trainer.training_step`` is that list, one method per phase, each
handing its results to the next; the pieces the run is built from come from ``setup_run``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers import get_scheduler

from pipeline import artifacts
from pipeline.credit_truth import TASK as CREDIT_TASK
from pipeline.credit_truth import OracleImportance
from pipeline.credit_truth import step_metrics as credit_step_metrics
from pipeline.generation import SamplingParams
from pipeline.grpo import online_importance
from pipeline.grpo.advantages import group_advantages, zero_std_fraction
from pipeline.grpo.checkpoints import rng_state, save_checkpoint, set_rng_state
from pipeline.grpo.config import GRPOArgs
from pipeline.grpo.distributed import gather_objects, global_token_metrics, interleave_groups, reduce_metrics
from pipeline.grpo.evaluation import evaluate
from pipeline.grpo.importance_guard import check_importance_gain
from pipeline.grpo.is_correction import correction_metrics, importance_sampling_ratio, sampling_logprobs
from pipeline.grpo.losses import mask_truncated_completions
from pipeline.grpo.microbatch import PolicyBatch, StepResult, accumulate, score
from pipeline.grpo.paired_rollout import Pairing, collect_pairs
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
from pipeline.grpo.setup_run import (
    build_backend,
    build_sampler,
    calibrate_reward_model,
    complete_args,
    launch,
    load_importance,
    load_prompts,
    make_fabric,
    resume_from,
)
from pipeline.grpo.softmask import NEEDS_ENTROPY, soft_mask_weights
from pipeline.models import load_tokenizer, model_slug
from pipeline.tasks import task_slug
from pipeline.trackers import numeric_only

if TYPE_CHECKING:
    from lightning.fabric import Fabric

log = logging.getLogger(__name__)

EntropyWeights = Callable[[Tensor], Tensor]  # accumulate's weights_from_entropies
StateWeights = Callable[[Any, slice], Tensor]  # accumulate's weights_from_states


def run_dir_for(args: GRPOArgs) -> Path:
    name = args.run_name or f"{args.softmask}_{args.sampler}_{args.identity()}"
    return artifacts.stage_dir(args.out_dir, task_slug(args.task_name), model_slug(args.model_name)) / "grpo" / name


def make_scheduler(args: GRPOArgs, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule by name (TRL's default: linear), stepped once per training step over --max_steps."""
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup(),
                         num_training_steps=args.max_steps)


def build_models(args: GRPOArgs, fabric: Fabric) -> tuple[nn.Module, nn.Module | None, Any, Any,
                                                         torch.optim.lr_scheduler.LambdaLR]:
    """The policy, its KL reference (None with LoRA: the policy with adapters disabled), the Fabric-wrapped
    model and optimizer, and the scheduler. Seeded first: LoRA's initial adapter and every later torch draw
    (dropout, the shuffled control) follow --seed."""
    torch.manual_seed(args.seed)
    policy = build_policy(args)
    reference = build_reference(args)
    optimizer = build_optimizer(policy, args)
    scheduler = make_scheduler(args, optimizer)
    model, optimizer = setup(fabric, policy, optimizer)
    return policy, None if reference is None else fabric.to_device(reference), model, optimizer, scheduler


class Trainer:
    """Holds the run's objects; ``fit`` is the loop, ``training_step`` one step's phases."""

    def __init__(self, args: GRPOArgs):
        complete_args(args)
        self.args, self.run_dir = args, run_dir_for(args)
        self.checkpoint = resume_from(self.run_dir, args)
        self.fabric = make_fabric(args, self.run_dir)
        self.importance_check = (check_importance_gain(args.softmask, args.importance_net, args.require_importance_gain)
                                 if args.importance == "offline" else None)  # online: judged during the run
        launch(self.fabric, args.prompts_per_step)
        self.tokenizer = load_tokenizer(args.model_name)
        self.importance = load_importance(args, self.tokenizer, self.fabric.device)
        self.rows, self.prompts, self.eval_rows, self.eval_prompts = load_prompts(args, self.tokenizer)
        self.sampler = build_sampler(args, self.rows)
        self.policy, self.reference, self.model, self.optimizer, self.scheduler = build_models(args, self.fabric)
        self.online = (online_importance.from_args(args, self.policy.config.hidden_size, self.tokenizer,
                                                   self.fabric.device) if args.importance == "online" else None)
        self.backend = build_backend(args, self.tokenizer, self.model, self.fabric.device)
        self.params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
        self.step = 0

    # ---- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {"policy": checkpoint_entry(self.model, self.args.use_peft), "optimizer": self.optimizer,
                 "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state(),
                 "step": self.step, "args": asdict(self.args)}
        if self.online is not None:
            state["online"] = self.online  # the head, its optimizer, the pair buffer, the fallback switch
        return state

    def save(self, tables: dict[str, RunTable], resumable: bool = False) -> Path:
        """``resumable``: the whole state even under --save_only_model (a preemption's checkpoint)."""
        return save_checkpoint(self.fabric, self.run_dir / "checkpoints", self.step, self._state(),
                               self.args.save_total_limit, before_publish=lambda: self._flush(tables),
                               only_model=self.args.save_only_model and not resumable)

    def _flush(self, tables: dict[str, RunTable]) -> None:
        """Rank 0, before a checkpoint appears: a checkpoint never lacks the rows up to its step."""
        for table in tables.values():
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
    def training_step(self, indices: list[int]) -> dict[str, Any]:
        """One step on the sampler's ``indices``: this rank generates its share, every rank sees all rewards.
        Returns the step's metrics and every rank's samples."""
        mine = self._my_share(indices)
        t0 = time.perf_counter()
        exp, pairing = self._generate(mine)
        t_gen = time.perf_counter() - t0
        rewards = self._gather_rewards(exp.rewards)
        batch, num_items = self._policy_batch(exp, self._advantages(rewards, len(indices)))
        sampled = self._sampled_logprobs(exp)
        batch.old_logps, batch.is_ratio = self._old_logprobs(batch, sampled)
        batch.ref_logps = self._reference_logprobs(batch)
        answers = [str(self.rows[i].get("answer")) for i in mine for _ in range(self.args.group_size)]
        batch.weights, from_entropies, from_states = self._soft_mask(exp, batch.completion_mask, answers, pairing)
        result, grad_norm = self._optimize(batch, num_items, from_entropies, from_states)
        credit = self._credit_metrics(answers, exp, batch.completion_mask, result.weights)
        logged = self._loss_metrics(result, batch, sampled)
        online = self._update_online(mine, exp.rewards, pairing, batch.completion_mask)
        sampler_sha = self._feed_sampler(indices, rewards)
        metrics = self._metrics(indices, exp, rewards, grad_norm=grad_norm, sampler_sha=sampler_sha,
                                seconds=(t_gen, time.perf_counter() - t0), logged=logged, mask=batch.completion_mask,
                                result=result, online=online, credit=credit)
        return {"metrics": metrics, "samples": self._samples(mine, exp, batch.advantages)}

    def _my_share(self, indices: list[int]) -> list[int]:
        return indices[self.fabric.global_rank::self.fabric.world_size]

    def _generate(self, mine: list[int]) -> tuple[Experience, Pairing | None]:
        """G scored completions of each of this rank's prompts; drawn as sister pairs for the online head."""
        args = self.args
        sampling = (self.backend, self.tokenizer, [self.rows[i] for i in mine], [self.prompts[i] for i in mine],
                    args.group_size, self.params, args.rewards, args.seed, self.step, args.max_steps)
        if self.online is None:
            return collect(*sampling), None
        return collect_pairs(*sampling, self.online.split_limit(args.max_new_tokens))

    def _gather_rewards(self, local: np.ndarray) -> np.ndarray:
        """Rewards of every rank's groups, in the sampler's prompt order."""
        world, group = self.fabric.world_size, self.args.group_size
        if world == 1:
            return local
        gathered = self.fabric.all_gather(torch.as_tensor(local, dtype=torch.float64)).cpu().numpy()
        per_rank = gathered.reshape(world, -1, group)  # (rank, prompt k, G); global prompt = rank + world*k
        return per_rank.transpose(1, 0, 2).reshape(-1)

    def _advantages(self, rewards: np.ndarray, num_prompts: int) -> Tensor:
        """Group advantages of every rank's completions, then this rank's rows (prompts rank, rank + world, ...)."""
        args, fabric = self.args, self.fabric
        every = group_advantages(torch.as_tensor(rewards, dtype=torch.float32), args.group_size, args.scale_rewards)
        local_rows = np.concatenate([np.arange(g * args.group_size, (g + 1) * args.group_size)
                                     for g in range(fabric.global_rank, num_prompts, fabric.world_size)])
        return every[local_rows].to(fabric.device)

    def _policy_batch(self, exp: Experience, advantages: Tensor) -> tuple[PolicyBatch, Tensor]:
        """This rank's completions on its device (truncated ones masked out under --mask_truncated_completions),
        and the loss's num_items_in_batch: the completion tokens of every rank, over the number of ranks."""
        fabric = self.fabric
        input_ids, attention = exp.input_ids.to(fabric.device), exp.attention_mask.to(fabric.device)
        mask = exp.completion_mask.to(fabric.device)
        if self.args.mask_truncated_completions:
            mask = mask_truncated_completions(mask, exp.truncated.to(fabric.device))
        num_items = fabric.all_reduce(mask.sum(), reduce_op="sum") / fabric.world_size
        return PolicyBatch(input_ids, attention, mask, advantages), num_items

    def _sampled_logprobs(self, exp: Experience) -> Tensor | None:
        """vLLM's log-probs of its own samples when the correction is on (the hf backend samples the policy: None)."""
        if not self.args.vllm_importance_sampling_correction:
            return None
        sampled = sampling_logprobs(exp.completions, exp.completion_len)
        return None if sampled is None else sampled.to(self.fabric.device)

    def _old_logprobs(self, batch: PolicyBatch, sampled: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The policy's log-probs before its update, needed when it updates more than once or vLLM's samples
        are corrected, and that correction's truncated ratio; None where not needed."""
        args = self.args
        if args.num_iterations <= 1 and sampled is None:
            return None, None
        old, _ = score(self.model, batch, args.per_device_train_batch_size, args.temperature,
                       chunk_size=args.logprob_chunk_size)
        if sampled is None:
            return old, None
        return old, importance_sampling_ratio(old, sampled, batch.completion_mask, args.vllm_importance_sampling_mode,
                                              args.vllm_importance_sampling_clip_min,
                                              args.vllm_importance_sampling_clip_max)

    def _reference_logprobs(self, batch: PolicyBatch) -> Tensor | None:
        """The KL reference's log-probs under --beta (the frozen copy, or the policy with adapters off); else None."""
        args = self.args
        if not args.beta:
            return None
        with reference_model(self.model, self.reference) as reference, self.fabric.autocast():
            logps, _ = score(reference, batch, args.per_device_train_batch_size, args.temperature,
                             chunk_size=args.logprob_chunk_size)
        return logps

    def _soft_mask(self, exp: Experience, mask: Tensor, answers: list[str],
                   pairing: Pairing | None) -> tuple[Tensor | None, EntropyWeights | None, StateWeights | None]:
        """The soft mask's weights where f alone makes them; else what makes them during the loss's forward:
        the policy's entropies (the entropy masks) or its hidden states (the online head)."""
        args = self.args
        from_entropies = ((lambda entropies: self._weights(exp, mask, entropies, answers))
                          if args.softmask in NEEDS_ENTROPY else None)
        if self.online is not None:
            lengths = exp.completion_mask.sum(1).long().to(self.fabric.device)
            return None, from_entropies, self.online.weights_hook(args.softmask, args.softmask_strength, mask,
                                                                  lengths, pairing)
        fixed = None if args.softmask in NEEDS_ENTROPY else self._weights(exp, mask, None, answers)
        return fixed, from_entropies, None

    def _weights(self, exp: Experience, mask: Tensor, entropies: Tensor | None, answers: list[str]) -> Tensor:
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

    def _optimize(self, batch: PolicyBatch, num_items: Tensor, from_entropies: EntropyWeights | None,
                  from_states: StateWeights | None) -> tuple[StepResult, Tensor]:
        """--num_iterations clipped optimizer steps on the batch, then the scheduler's step and the engine's
        new weights; the last iteration's result and gradient norm."""
        args, fabric = self.args, self.fabric
        log_entropy = args.entropy_every > 0 and (self.step + 1) % args.entropy_every == 0
        loss_options = {"beta": args.beta, "epsilon_low": args.epsilon, "epsilon_high": args.epsilon_high,
                        "importance_sampling_level": args.importance_sampling_level,
                        "max_completion_length": args.max_new_tokens, "num_items_in_batch": num_items}
        for _ in range(args.num_iterations):
            result = accumulate(fabric, self.model, batch, args.loss_type, loss_options,
                                args.per_device_train_batch_size, args.temperature, with_entropy=log_entropy,
                                chunk_size=args.logprob_chunk_size, weights_from_entropies=from_entropies,
                                weights_from_states=from_states,
                                state_kind="none" if self.online is None else self.online.state_kind)
            if from_states is not None:  # later iterations keep the first forward's weights
                batch, from_states = replace(batch, weights=result.weights), None
            grad_norm = fabric.clip_gradients(self.model, self.optimizer, max_norm=args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.backend.sync_weights(self.model)
        return result, grad_norm

    def _credit_metrics(self, answers: list[str], exp: Experience, mask: Tensor,
                        weights: Tensor | None) -> dict[str, float]:
        """The credit task's view of the weights the loss used against its known decision tokens (else none)."""
        if self.args.task_name != CREDIT_TASK:
            return {}
        return credit_step_metrics(answers, exp.texts, mask if weights is None else weights, mask,
                                   None if self.online is None else self.online.step_curves())

    def _loss_metrics(self, result: StepResult, batch: PolicyBatch, sampled: Tensor | None) -> dict[str, float]:
        """Global values: this rank's shard averaged over ranks."""
        logged = {"loss": result.loss, **result.metrics}
        if sampled is not None:
            logged.update(correction_metrics(batch.old_logps, sampled, batch.completion_mask, batch.is_ratio))
        return reduce_metrics(self.fabric, logged)

    def _update_online(self, mine: list[int], rewards: np.ndarray, pairing: Pairing | None,
                       mask: Tensor) -> dict[str, float]:
        """The online head takes in every rank's pairs of the step and refits when due; its ``online/*`` metrics."""
        if self.online is None:
            return {}
        fabric = self.fabric
        return self.online.end_step(
            self.step + 1, [self.rows[i]["prompt_id"] for i in mine for _ in range(self.args.group_size)], rewards,
            pairing, mask, None if fabric.world_size == 1 else lambda t: fabric.all_gather(t).flatten(0, 1))

    def _feed_sampler(self, indices: list[int], rewards: np.ndarray) -> str:
        """Each prompt's mean reward to the sampler; the hash of its new state, the same on every rank."""
        per_prompt = np.nanmean(rewards.reshape(-1, self.args.group_size), axis=1)
        scored = np.isfinite(per_prompt)  # a prompt none of whose completions got a reward teaches nothing
        self.sampler.update([i for i, ok in zip(indices, scored, strict=True) if ok], per_prompt[scored].tolist())
        return self._check_sampler_agreement()

    def _check_sampler_agreement(self) -> str:
        """Every rank fed its sampler the same gathered rewards: fail loudly if the states differ."""
        sha = hashlib.sha256(json.dumps(self.sampler.state_dict(), sort_keys=True).encode()).hexdigest()[:12]
        if self.fabric.world_size > 1:
            mine = torch.tensor([int(sha, 16)], dtype=torch.int64, device=self.fabric.device)
            if not torch.all(self.fabric.all_gather(mine) == mine):
                raise RuntimeError(f"sampler states diverged across ranks at step {self.step}")
        return sha

    def _metrics(self, indices: list[int], exp: Experience, rewards: np.ndarray, *, grad_norm: Tensor,
                 sampler_sha: str, seconds: tuple[float, float], logged: dict[str, float], mask: Tensor,
                 result: StepResult, online: dict[str, float], credit: dict[str, float]) -> dict[str, Any]:
        """The step's metrics row, every value global; ``seconds``: (generation, whole step)."""
        group = self.args.group_size
        t_gen, elapsed = seconds
        levels = np.array([self.rows[i]["level"] for i in indices for _ in range(group)])
        return {
            **exp.reward_metrics,
            "step": self.step + 1, "reward_mean": float(np.nanmean(rewards)), "reward_std": float(np.nanstd(rewards)),
            "frac_zero_std_groups": zero_std_fraction(torch.as_tensor(rewards), group),
            "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "completion_len": float(exp.completion_mask.sum(1).mean()),
            "truncated_frac": float(exp.truncated.float().mean()),
            "tokens_per_s": float(exp.completion_mask.sum() / t_gen), "step_time_s": elapsed,
            "generation_time_s": t_gen, "reward_failures": sum(exp.failures.values()), "sampler_sha": sampler_sha,
            **{f"reward_mean/level_{lv}": float(np.nanmean(rewards[levels == lv])) for lv in sorted(set(levels))},
            **{f"reward/{name}": float(np.nanmean(v)) for name, v in exp.per_function.items()},
            **logged,
            **global_token_metrics(self.fabric, mask, result.entropies, result.weights),  # entropy, weights/*
            **online,
            **credit,
            **{f"sampler/{k}": float(v) for k, v in self.sampler.probabilities().items()},
        }

    def _samples(self, mine: list[int], exp: Experience, advantages: Tensor) -> list[dict[str, Any]]:
        """Every rank's completions of the step as samples.parquet rows, in the sampler's prompt order."""
        group = self.args.group_size
        samples = [{**{column: values[i] for column, values in exp.reward_extra.items() if len(values) == len(exp.texts)},
                    "step": self.step + 1, "prompt_id": self.rows[mine[i // group]]["prompt_id"],
                    "level": self.rows[mine[i // group]]["level"],
                    "prompt": self.prompts[mine[i // group]][0], "completion": exp.texts[i],
                    "reward": float(exp.rewards[i]), "advantage": float(advantages[i]),
                    **{f"reward_{n}": float(v[i]) for n, v in exp.per_function.items()}}
                   for i in range(len(exp.texts))]
        return interleave_groups(gather_objects(self.fabric, samples), group)

    # ---- the loop ----------------------------------------------------------------------------
    def _evaluate(self, tables: dict[str, RunTable]) -> None:
        fabric = self.fabric
        rows = evaluate(self.backend, self.tokenizer, self.eval_rows, self.eval_prompts, self.args.max_new_tokens,
                        fabric.global_rank, fabric.world_size, gather=lambda obj: gather_objects(fabric, obj),
                        temperature=self.args.eval_temperature)
        tables["eval"].extend([{"step": self.step, **row} for row in rows])
        self.fabric.log_dict({f"eval/{key}/level_{row['level']}": row[key] for row in rows
                              for key in ("accuracy", "mean_length")}, step=self.step)
        if self.fabric.is_global_zero:
            refresh_plots(tables["metrics"].frame(), tables["eval"].frame(), self.run_dir)
        log.info("eval step %d: %s", self.step, ", ".join(f"L{r['level']} {r['accuracy']:.2f}" for r in rows))

    def fit(self) -> Path:
        args, fabric = self.args, self.fabric
        hybrid = calibrate_reward_model(args, self.run_dir, self.backend, self.tokenizer, self.rows, self.prompts,
                                        self.params, fabric)  # on the base weights, before a checkpoint loads
        checkpoint = self.checkpoint
        if checkpoint is not None:
            self.restore(checkpoint)
        if fabric.is_global_zero:
            artifacts.ensure_writable_dir(self.run_dir / "checkpoints")
        resume_step = self.step if checkpoint is not None else None
        tables = {name: RunTable(self.run_dir / file, resume_step) for name, file in
                  (("metrics", "metrics.csv"), ("eval", "eval.csv"), ("samples", "samples.parquet"))}
        started, t0 = artifacts.now_iso(), time.perf_counter()
        for logger in fabric.loggers:
            logger.log_hyperparams(asdict(args))
        preempted = PreemptionFlag()
        if self.step == 0:
            self._evaluate(tables)
        bar = tqdm(range(self.step, args.max_steps), initial=self.step, total=args.max_steps, desc="grpo",
                   disable=not fabric.is_global_zero)
        window: list[dict[str, Any]] = []  # metrics of the steps since the last logged row
        for _ in bar:
            out = self.training_step(self.sampler.next_batch())
            self.step += 1
            window.append(out["metrics"])
            tables["samples"].extend(out["samples"])
            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                row = window_mean(window)
                window = []
                tables["metrics"].extend([row])
                fabric.log_dict(numeric_only(row), step=self.step)
                if fabric.is_global_zero:
                    tables["metrics"].flush()
            m = out["metrics"]
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if self.step % args.eval_every == 0 or self.step == args.max_steps:
                self._evaluate(tables)
            if self.step % args.save_every == 0 or self.step == args.max_steps:
                self.save(tables)
            stop = fabric.all_reduce(torch.tensor(float(bool(preempted)), device=fabric.device), reduce_op="max")
            if stop.item() > 0:
                path = self.save(tables, resumable=True)
                log.info("signal %s: saved %s at step %d; requeueing", preempted.received, path, self.step)
                code = requeue_slurm_job() if fabric.is_global_zero else 0
                sys.exit(fabric.broadcast(code))
        return self.finish(tables, started, time.perf_counter() - t0, hybrid)

    def finish(self, tables: dict[str, RunTable], started: str, runtime: float,
               hybrid: dict[str, Any] | None) -> Path:
        """The policy, the tables and metadata.json; ``hybrid``: the reward model's calibration, if any."""
        save_policy(self.model, self.tokenizer, self.run_dir / "policy", self.fabric.is_global_zero)
        if self.fabric.is_global_zero:
            self.write_summary(tables, started, runtime, hybrid)
        self.fabric.barrier()  # the ranks leave together: one exiting while rank 0 writes can abort its gloo teardown
        return self.run_dir

    def write_summary(self, tables: dict[str, RunTable], started: str, runtime: float,
                      hybrid: dict[str, Any] | None) -> None:
        """Rank 0's tables, plots and metadata.json, and the run's last log line."""
        metrics, evals = tables["metrics"].frame(), tables["eval"].frame()
        for table in tables.values():
            table.flush()
        refresh_plots(metrics, evals, self.run_dir)
        final_eval = evals[evals["step"] == evals["step"].max()] if not evals.empty else evals
        metadata = {"arguments": asdict(self.args), "run_dir": str(self.run_dir), "started": started,
                    "finished": artifacts.now_iso(), "runtime_s_this_process": round(runtime, 2),
                    "steps": self.step, "hybrid_reward": hybrid, "final_eval": final_eval.to_dict("records"),
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


def run(args: GRPOArgs) -> Path:
    return Trainer(args).fit()

