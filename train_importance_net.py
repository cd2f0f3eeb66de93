"""Stage 2: fit the importance network on a paired-rollout dump (docs/importance.md, maths in docs/design.md).

    python train_importance_net.py --rollouts rollout_dump/<task>/<model>/rollouts_<tag> [--backbone M] [...]
"""

from __future__ import annotations

import click

from pipeline.cli import (
    ACCELERATOR,
    BELOW_ONE,
    DEVICES,
    FRACTION,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PRECISION,
    RUN_NAME,
    config_option,
    field_defaults,
    option,
    report_to_option,
    run_stage,
    stage_command,
)
from pipeline.importance.config import ImportanceArgs
from pipeline.importance.data import GROUP_STATS
from pipeline.importance.forms import FORMS
from pipeline.importance.loss import LIKELIHOODS, UNITS
from pipeline.importance.model import BACKBONE_MODES, FEATURES
from pipeline.importance.train import F_ENDS, run

DEFAULT = field_defaults(ImportanceArgs)


@stage_command()
@config_option
@option("rollouts", required=True, type=click.Path(),
        help="Stage-1 dump: a parquet file or a directory of part files.")
@option("backbone", default=DEFAULT["backbone"],
        help="LM backbone (alias, HF dir or hub id) [default: the dump's model_name].")
@option("reward_key", default=DEFAULT["reward_key"], help="Reward column to model: reward, reward_<name> or <name>.")
@option("group_stats", type=click.Choice(GROUP_STATS), default=DEFAULT["group_stats"],
        help="m_q, v_q pooled over every completion of the prompt in the dump, or from the pair's own group "
             "(biased for small groups: docs/importance.md).")
@option("likelihood", type=click.Choice(["auto", *LIKELIHOODS]), default=DEFAULT["likelihood"],
        help="Pair loss: auto = bernoulli on pairs of 0/1 prompts, gaussian on the others (docs/importance.md).")
@option("f_form", type=click.Choice(FORMS), default=DEFAULT["f_form"],
        help="monotone: f = 1 - prod(1 - hazard) never falls; direct: f = sigmoid(head) at each position.")
@option("f_end", type=click.Choice(F_ENDS), default=DEFAULT["f_end"],
        help="pinned: f(len) = 1 (reward a function of the text); learnt: from the head (noisy rewards).")
@option("features", type=click.Choice(FEATURES), default=DEFAULT["features"],
        help="What the head sees per completion token: its hidden state, a basis of its position, or both.")
@option("backbone_mode", type=click.Choice(BACKBONE_MODES), default=DEFAULT["backbone_mode"],
        help="What of the backbone trains.")
@option("last_k", type=POSITIVE_INT, default=DEFAULT["last_k"], help="Trainable last layers (--backbone_mode last_k).")
@option("lora_r", type=POSITIVE_INT, default=DEFAULT["lora_r"], help="LoRA rank (--backbone_mode lora).")
@option("lora_alpha", type=POSITIVE_INT, default=DEFAULT["lora_alpha"], help="LoRA alpha (--backbone_mode lora).")
@option("head_hidden", type=NON_NEGATIVE_INT, default=DEFAULT["head_hidden"],
        help="Hidden width of the head (one GELU layer); 0 = linear head.")
@option("val_fraction", type=FRACTION, default=DEFAULT["val_fraction"],
        help="Share of prompts held out for validation.")
@option("max_epochs", type=POSITIVE_INT, default=DEFAULT["max_epochs"], help="Most passes over the training pairs.")
@option("patience", type=NON_NEGATIVE_INT, default=DEFAULT["patience"],
        help="Stop after this many epochs without a better val loss; 0 = never.")
@option("per_device_train_batch_size", deprecated=("batch_size",), type=POSITIVE_INT,
        default=DEFAULT["per_device_train_batch_size"], help="Pairs per batch, on each device.")
@option("lr", type=NON_NEGATIVE_FLOAT, default=DEFAULT["lr"], help="Learning rate of the head.")
@option("ema_decay", type=BELOW_ONE, default=DEFAULT["ema_decay"],
        help="Validate, keep and export an exponential moving average of the weights, by this per step; 0 = the raw weights.")
@option("max_grad_norm", type=NON_NEGATIVE_FLOAT, default=DEFAULT["max_grad_norm"],
        help="Clip the gradient's global norm to this (a Gaussian pair near f = 1 can give a huge one); 0 = no clipping.")
@option("weight_decay", type=NON_NEGATIVE_FLOAT, default=DEFAULT["weight_decay"],
        help="AdamW weight decay of the head's (and trained body's) weights.")
@option("backbone_lr", type=NON_NEGATIVE_FLOAT, default=DEFAULT["backbone_lr"],
        help="Learning rate of trainable backbone weights.")
@option("precision", type=PRECISION, default=DEFAULT["precision"], help="Lightning precision: 32-true, bf16-mixed, ...")
@option("devices", type=DEVICES, default=DEFAULT["devices"],
        help="Lightning devices: a count, auto, -1, or ids like 0,1.")
@option("accelerator", type=ACCELERATOR, default=DEFAULT["accelerator"],
        help="Lightning accelerator: auto, cpu, gpu, ...")
@option("seed", type=NON_NEGATIVE_INT, default=DEFAULT["seed"],
        help="Seeds the train/validation split of prompts, the batches and the head's initial weights.")
@option("run_name", type=RUN_NAME, default=DEFAULT["run_name"],
        help="Run directory name [default: <mode>-<reward column>-<group_stats>].")
@option("out_dir", type=click.Path(file_okay=False), default=DEFAULT["out_dir"],
        help="Root of the output tree, as in stages 1 and 3: the run goes to <out_dir>/<task>/<model>/importance_net/"
             "<run_name>, task and model the dump's [default: beside the dump, <dump's model dir>/importance_net].")
@option("resume", is_flag=True, default=DEFAULT["resume"], help="Continue the run from its last checkpoint.")
@option("report_examples", type=NON_NEGATIVE_INT, default=DEFAULT["report_examples"],
        help="Validation completions in report.html; 0 = no report.")
@report_to_option(DEFAULT["report_to"])
@run_stage
def main(**kwargs) -> None:
    """Train f_theta(t) = Corr(R1, R2 | shared prefix of t tokens) by maximum likelihood on paired rollouts."""
    summary = run(ImportanceArgs(**kwargs))
    lo, hi = summary["gain_ci95"]
    click.echo(f"wrote {summary['run_dir']} (export: {summary['export']})")
    click.echo(f"val {summary['likelihood']} loss {summary['loss']:.4f} vs {summary['baseline_loss']:.4f} for the best "
               f"constant f = {summary['baseline_f']:.3f}: gain {summary['gain']:+.4f} {UNITS[summary['likelihood']]} "
               f"(95% CI {lo:+.4f}, {hi:+.4f} over {summary['prompts']} prompts, {summary['pairs']} pairs; "
               f"kept {summary['chosen']})")
    truth = summary["truth"]
    if truth:
        click.echo(f"true f (credit task, {truth['completions']} val completions): MAE of f {truth['mae_f']:.3f} "
                   f"(uniform t/n: {truth['mae_f_uniform']:.3f}); of increments on decision tokens "
                   f"{truth['mae_increment_decision']:.3f} ({truth['mae_increment_decision_uniform']:.3f}), on the "
                   f"others {truth['mae_increment_other']:.3f} ({truth['mae_increment_other_uniform']:.3f}); weight on "
                   f"decision tokens {truth['decision_share_net']:.2f} (true {truth['decision_share_true']:.2f}, "
                   f"their share of tokens {truth['decision_share_tokens']:.2f})")


if __name__ == "__main__":
    main()
