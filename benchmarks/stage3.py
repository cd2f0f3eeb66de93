"""Stage 3: our GRPO step (``--softmask none``) against TRL's GRPOTrainer doing the same work, and
``--softmask delta`` (offline importance net, and ``--importance online``) against ``none``, side by
side in one process on the embedded model.

Same settings for all three: the same prompts in the same order (P per step), G completions each,
``max_new_tokens`` = TRL's ``max_completion_length``, temperature 1, lr 1e-6, beta 0 (no reference
model), loss ``dapo``, one optimizer step per generation (TRL: ``per_device_train_batch_size`` =
P * G, ``gradient_accumulation_steps`` = 1, so ``steps_per_generation`` = 1 and
``generation_batch_size`` = P * G completions per step), fp32, no gradient checkpointing (TRL's
GRPOConfig turns it on by default; ours is off unless ``--gradient_checkpointing``, so TRL's is turned
off for the same work).

TRL's ``train()`` runs the loop; a callback times each TRL step (``on_step_begin`` ->
``on_step_end``: generation, rewards, loss, backward, optimizer step) and runs our two trainers'
``Trainer.training_step`` for the same prompts between TRL's steps, the order reversed every
step (TRL, none, delta, online / online, delta, none, TRL). Step 1 of each variant is a warm-up and is
left out. Targets (issues): ours / TRL <= 1.0, delta / none <= 1.10, online / none <= 1.03.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.common import MODEL, TASK, Context
from benchmarks.timing import Check, load_average, median, ratio, timed_method

TARGET_TRL = 1.0
TARGET_DELTA = 1.10
TARGET_ONLINE = 1.03
TARGET_CREDIT_STEP_S = 1.0  # issue 21: a credit-tiny step of 8 prompts x G 8 under 1 s on 2 CPU cores
VARIANTS = ("none", "delta", "online")  # ours; "online" is --softmask delta --importance online


@dataclass
class Config:
    prompts_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 48
    steps: int = 4  # measured steps per variant, after one warm-up step
    levels: tuple[int, ...] = (0, 1)
    seed: int = 0


QUICK = Config(max_new_tokens=32, steps=2)


def importance_export(ctx: Context) -> tuple[str, str]:
    """The stage-2 bench's export when it ran, else an untrained net (same cost to evaluate)."""
    if ctx.shared.get("importance_export"):
        return ctx.shared["importance_export"], "trained by the stage-2 benchmark of this run"
    from pipeline.dump import tokenizer_fingerprint
    from pipeline.importance.export import save_export
    from pipeline.importance.model import ImportanceNet, NetConfig

    path = save_export(ImportanceNet(NetConfig(backbone=MODEL, head_hidden=0)), ctx.workdir / "stage3" / "export",
                       tokenizer=tokenizer_fingerprint(ctx.tokenizer), reward_key="reward", group_stats="group",
                       baseline_f=0.3)
    return str(path), "untrained export (frozen backbone + random linear head): same cost as a trained one"


def our_trainer(ctx: Context, cfg: Config, softmask: str, export: str | None, importance: str = "offline"):
    from pipeline.grpo.config import GRPOArgs
    from pipeline.grpo.train import Trainer

    steps = cfg.steps + 1
    args = GRPOArgs(model_name=MODEL, task_name=TASK, importance_net=export, softmask=softmask,
                    levels=cfg.levels, num_train_prompts=cfg.prompts_per_step * steps, eval_prompts=1,
                    prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size, max_steps=steps,
                    max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0,
                    lr=1e-6, lr_scheduler_type="constant",
                    per_device_generation_batch_size=max(64, cfg.prompts_per_step * cfg.group_size), seed=cfg.seed, out_dir=str(ctx.workdir / "stage3"), run_name=f"ours-{softmask}-{importance}",
                    importance=importance)
    return Trainer(args)


def credit_step_seconds(ctx: Context, steps: int) -> dict[str, float]:
    """Median step time of the credit task's own policy (8 prompts x G 8, as studies/cpu_credit.yaml), plain
    and with the oracle's soft mask, interleaved step by step after one warm-up step."""
    from pipeline.grpo.config import GRPOArgs
    from pipeline.grpo.train import Trainer

    def trainer(softmask: str, importance: str) -> Trainer:
        return Trainer(GRPOArgs(model_name="credit-tiny", task_name="credit", softmask=softmask, importance=importance,
                                levels=(0, 1, 2, 3), num_train_prompts=8 * (steps + 1), eval_prompts=1,
                                prompts_per_step=8, group_size=8, max_steps=steps + 1, max_new_tokens=26,
                                lr=3e-4, seed=0, out_dir=str(ctx.workdir / "stage3"),
                                run_name=f"credit-{softmask}-{importance}"))

    runs = {"none": trainer("none", "offline"), "oracle": trainer("delta", "oracle")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(steps + 1):
        for name, run in runs.items():
            metrics = run.training_step(list(range(step * 8, (step + 1) * 8)))["metrics"]
            run.step += 1
            if step:
                seconds[name].append(metrics["step_time_s"])
    return {name: median(values) for name, values in seconds.items()}


def trl_reward(weights: dict[str, float], columns: list[str]):
    """Our weighted task reward with TRL's reward-function signature (conversational completions)."""
    from pipeline.scoring import score

    def reward(prompts, completions, completion_ids, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rows = [{k: kwargs[k][i] for k in columns if k in kwargs} for i in range(len(texts))]
        return score(weights, rows, [""] * len(texts), texts, completion_ids).total.tolist()

    reward.__name__ = "task_reward"
    return reward


def run(ctx: Context, cfg: Config) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.models import load_causal_lm

    load_before = load_average()
    export, export_note = importance_export(ctx)
    ours = {"none": our_trainer(ctx, cfg, "none", None), "delta": our_trainer(ctx, cfg, "delta", export),
            "online": our_trainer(ctx, cfg, "delta", None, importance="online")}
    importance_s: dict[str, float] = {}
    timed_method(ours["delta"].importance, "score_padded", importance_s, "score_padded")
    rows = ours["none"].rows
    assert rows == ours["delta"].rows == ours["online"].rows
    P, G = cfg.prompts_per_step, cfg.group_size
    columns = sorted({k for row in rows for k in row} - {"question"})
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": row["question"]}],
                                           **{k: row[k] for k in columns}} for row in rows])
    trl_args = GRPOConfig(
        output_dir=str(ctx.workdir / "stage3" / "trl"), per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=cfg.max_new_tokens,
        max_steps=cfg.steps + 1, learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, temperature=1.0,
        top_p=1.0, num_iterations=1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, save_strategy="no", shuffle_dataset=False, seed=cfg.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    samples: list[dict[str, Any]] = []
    trl_gen: dict[str, float] = {}
    trl_prompt_ids: list[list[int]] = []

    def run_ours(step: int, order: list[str]) -> None:
        indices = list(range(step * P, (step + 1) * P))
        for mode in order:
            trainer = ours[mode]
            importance_s.clear()
            m = trainer.training_step(indices)["metrics"]
            trainer.step += 1
            samples.append({"variant": mode, "step": step, "seconds": m["step_time_s"],
                            "generation_s": m["generation_time_s"], "importance_s": importance_s.get("score_padded", 0.0),
                            "completion_len": m["completion_len"], "reward_mean": m["reward_mean"]})

    class Interleave(TrainerCallback):
        """Runs our steps between TRL's, reversing the order every step; times TRL's step."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step
            if step % 2 == 1:
                run_ours(step, list(reversed(VARIANTS)))
            trl_gen.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.t0
            step = state.global_step - 1
            samples.append({"variant": "trl", "step": step, "seconds": seconds,
                            "generation_s": trl_gen.get("generate", float("nan"))})
            if step % 2 == 0:
                run_ours(step, list(VARIANTS))

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    policy = load_causal_lm(MODEL)
    trl = GRPOTrainer(model=policy, reward_funcs=[trl_reward(ours["none"].args.rewards, columns)], args=trl_args,
                      train_dataset=dataset, processing_class=ours["none"].tokenizer)
    original_single_turn = trl._generate_single_turn

    def single_turn(prompt_ids, *args, **kwargs):
        trl_prompt_ids.extend(prompt_ids)
        return original_single_turn(prompt_ids, *args, **kwargs)

    trl._generate_single_turn = single_turn
    timed_method(trl, "_generate_single_turn", trl_gen, "generate")
    callback = Interleave()
    trl.add_callback(callback)
    trl.train()

    # same prompts? TRL tokenises the conversational prompt with its own chat-template call
    ours_ids = [ours["none"].prompts[i][1] for i in range(len(rows))]
    expected = [ids for ids in ours_ids[: len(trl_prompt_ids) // G] for _ in range(G)]
    same_prompts = [list(p) for p in trl_prompt_ids] == expected
    trl_lens = [log["completions/mean_length"] for log in callback.logs if "completions/mean_length" in log]
    trl_step_time = [log["step_time"] for log in callback.logs if "step_time" in log]
    for s in samples:
        if s["variant"] == "trl" and s["step"] < len(trl_lens):
            s["completion_len"] = trl_lens[s["step"]]
            s["trl_reported_step_time"] = trl_step_time[s["step"]] if s["step"] < len(trl_step_time) else None

    measured = [s for s in samples if s["step"] >= 1]  # step 0 is the warm-up

    def by(variant: str) -> list[dict[str, Any]]:
        return sorted((s for s in measured if s["variant"] == variant), key=lambda s: s["step"])

    def step_ratio(a: str, b: str) -> list[float]:
        return [ratio(x["seconds"], y["seconds"]) for x, y in zip(by(a), by(b), strict=True)]

    summary: dict[str, Any] = {"config": asdict(cfg), "importance_export": export, "export_note": export_note,
                               "same_prompt_token_ids": same_prompts, "samples": samples,
                               "completions_per_step": P * G}
    for v in ("trl", *VARIANTS):
        rows_v = by(v)
        secs = [s["seconds"] for s in rows_v]
        gens = [s["generation_s"] for s in rows_v]
        summary[v] = {"median_step_s": median(secs), "median_generation_s": median(gens),
                      "median_rest_s": median([s - g for s, g in zip(secs, gens, strict=True)]),
                      "mean_completion_len": float(np.mean([s.get("completion_len", np.nan) for s in rows_v]))}
        if v == "delta":
            summary[v]["median_importance_s"] = median([s["importance_s"] for s in rows_v])
    summary["ratio_ours_over_trl_per_step"] = step_ratio("none", "trl")
    summary["ratio_delta_over_none_per_step"] = step_ratio("delta", "none")
    summary["ratio_ours_over_trl"] = median(summary["ratio_ours_over_trl_per_step"])
    summary["ratio_delta_over_none"] = median(summary["ratio_delta_over_none_per_step"])
    summary["ratio_online_over_none_per_step"] = step_ratio("online", "none")
    summary["ratio_online_over_none"] = median(summary["ratio_online_over_none_per_step"])
    summary["ratio_ours_over_trl_excl_generation"] = ratio(summary["none"]["median_rest_s"],
                                                           summary["trl"]["median_rest_s"])
    summary["ratio_generation_ours_over_trl"] = ratio(summary["none"]["median_generation_s"],
                                                      summary["trl"]["median_generation_s"])
    summary["credit_median_step_s"] = credit_step_seconds(ctx, cfg.steps)
    summary["load_average_before"], summary["load_average_after"] = load_before, load_average()
    summary["checks"] = [
        Check("stage3 credit-tiny step (8 prompts x G 8) s", summary["credit_median_step_s"]["none"],
              TARGET_CREDIT_STEP_S, "<=", f"median of {cfg.steps} steps").to_dict(),
        Check("stage3 ours(none) / TRL step time", summary["ratio_ours_over_trl"], TARGET_TRL, "<=",
              f"median of {cfg.steps} interleaved steps").to_dict(),
        Check("stage3 delta / none step time", summary["ratio_delta_over_none"], TARGET_DELTA, "<=",
              f"median of {cfg.steps} interleaved steps").to_dict(),
        Check("stage3 online delta / none step time", summary["ratio_online_over_none"], TARGET_ONLINE, "<=",
              f"median of {cfg.steps} interleaved steps").to_dict(),
    ]
    return summary


def rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    c = s["config"]
    out = [("setting", f"{c['prompts_per_step']} prompts/step x G={c['group_size']} = {s['completions_per_step']} "
                       f"completions, max_new_tokens {c['max_new_tokens']}, {c['steps']} steps after 1 warm-up"),
           ("same prompt token ids as TRL", s["same_prompt_token_ids"]),
           ("delta's importance net", s["export_note"])]
    names = {"trl": "TRL GRPOTrainer", "none": "ours --softmask none", "delta": "ours --softmask delta",
             "online": "ours --softmask delta --importance online"}
    out += [(f"credit-tiny, 8 prompts x G 8, {name}: median step s", seconds)
            for name, seconds in s["credit_median_step_s"].items()]
    for v in ("trl", *VARIANTS):
        d = s[v]
        out += [(f"{names[v]}: median step s", d["median_step_s"]),
                (f"{names[v]}:   generation s", d["median_generation_s"]),
                (f"{names[v]}:   rest s (rewards, logprobs, loss, backward, optim)", d["median_rest_s"]),
                (f"{names[v]}:   mean completion length", d["mean_completion_len"])]
        if v == "delta":
            out.append((f"{names[v]}:   importance scoring s (in rest)", d["median_importance_s"]))
    out += [("ours / TRL (median of per-step ratios)", s["ratio_ours_over_trl"]),
            ("  per-step", ", ".join(f"{x:.3f}" for x in s["ratio_ours_over_trl_per_step"])),
            ("  generation only, ours / TRL (medians)", s["ratio_generation_ours_over_trl"]),
            ("  without generation, ours / TRL (medians)", s["ratio_ours_over_trl_excl_generation"]),
            ("delta / none (median of per-step ratios)", s["ratio_delta_over_none"]),
            ("  per-step", ", ".join(f"{x:.3f}" for x in s["ratio_delta_over_none_per_step"])),
            ("online / none (median of per-step ratios)", s["ratio_online_over_none"]),
            ("  per-step", ", ".join(f"{x:.3f}" for x in s["ratio_online_over_none_per_step"])),
            ("load average before / after", f"{s['load_average_before']} / {s['load_average_after']}")]
    return out
