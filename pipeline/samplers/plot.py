"""`python -m pipeline.samplers.plot NAME --steps T ...`: draw a sampler's mixture over the steps
of a run to a PNG. Adaptive samplers get rewards from a toy learner (below), so their plots show
how they react; for fixed schedules the rewards are ignored.

Toy learner: rows of K levels x S sources. A prompt of level l from source j is solved with
probability sigmoid(3 (skill_l + 1 - l) - 0.5 j), and each sampled prompt of level l adds
`--learning-rate` to skill_l; the reward fed back is the share of 8 attempts solved.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.samplers.base import Sampler
from pipeline.samplers.registry import build

ATTEMPTS = 8


def synthetic_rows(levels: int, sources: int, rows_per_group: int, seed: int) -> list[dict[str, Any]]:
    """rows_per_group rows for each (source, level); complexity = level + U(0, 1)."""
    rng = np.random.default_rng(seed)
    return [
        {"level": level, "source": f"src{j}", "complexity": level + float(rng.random())}
        for j in range(sources)
        for level in range(levels)
        for _ in range(rows_per_group)
    ]


def simulate(
    sampler: Sampler, rows: list[dict[str, Any]], steps: int, learning_rate: float, seed: int
) -> list:
    """Run `steps` batches against the toy learner; the mixture before each batch."""
    rng = np.random.default_rng(seed + 1)
    skill = np.zeros(max(r["level"] for r in rows) + 1)
    history = []
    for _ in range(steps):
        history.append(sampler.probabilities())
        batch = sampler.next_batch()
        level = np.array([rows[i]["level"] for i in batch])
        source = np.array([int(rows[i]["source"].removeprefix("src")) for i in batch])
        p_solve = 1 / (1 + np.exp(-(3 * (skill[level] + 1 - level) - 0.5 * source)))
        sampler.update(batch, rng.binomial(ATTEMPTS, p_solve) / ATTEMPTS)
        np.add.at(skill, level, learning_rate)
    return history


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@click.command()
@click.argument("name")
@click.option("--steps", default=200, show_default=True, help="total_steps T of the run")
@click.option("--levels", default=4, show_default=True)
@click.option("--sources", default=1, show_default=True)
@click.option("--rows-per-group", "--rows_per_group", default=50, show_default=True)
@click.option("--batch-size", "--batch_size", default=32, show_default=True)
@click.option("--learning-rate", "--learning_rate", default=0.002, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--param", "params", multiple=True, help="sampler parameter KEY=VALUE (JSON value), repeatable")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="default: sampler_NAME.png"
)
def main(
    name: str,
    steps: int,
    levels: int,
    sources: int,
    rows_per_group: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    params: tuple[str, ...],
    out: Path | None,
) -> None:
    """Plot the probability trajectory of sampler NAME."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = synthetic_rows(levels, sources, rows_per_group, seed)
    kwargs = dict(_param(p) for p in params)
    try:
        sampler = build(name, rows, batch_size=batch_size, total_steps=steps, seed=seed, **kwargs)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    history = simulate(sampler, rows, steps, learning_rate, seed)
    keys = list(history[0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")(np.arange(len(keys)) % 20)
    ax.stackplot(range(steps), np.array([[h[k] for h in history] for k in keys]), labels=keys, colors=colors)
    ax.set(xlabel="step", ylabel="probability", xlim=(0, steps - 1), ylim=(0, 1))
    ax.set_title(textwrap.fill(" ".join([name, *params]), 90), fontsize="small")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    out = out or Path(f"sampler_{name}.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
