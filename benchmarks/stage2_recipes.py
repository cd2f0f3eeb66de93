"""Stage-2 recipes compared on one dump: the measurements behind docs/importance.md's defaults table.

    python -m benchmarks.stage2_recipes --rollouts DUMP [--reward_key correct] --recipes default,direct,...
    python -m benchmarks.stage2_recipes --truths regions,random_position,position_only --recipes default,direct

Each recipe is ``pipeline.importance.train.run`` with a few options changed from the CLI defaults
(``RECIPES``). With a frozen backbone, the recipes of one dump share its prefix states (computed once,
``FeatureCache``), so a sweep costs one backbone pass. Every run's validation predictions are then
scored under *every* likelihood that applies (each against its own best constant, with a bootstrap CI
over validation prompts), so recipes trained with different losses can be compared on one scale.
With ``--truths``, a synthetic dump of each truth (tests/synthetic_dump.py, 128 prompts x 8 groups of
8) is fitted on the tiny test backbone and scored against the known f on 300 fresh sequences:
per-region mean absolute error and the error at the t next to each jump. One JSON line per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "token_head": {"features": "state+position", "lr": 1e-2},  # the default before the context head
    "direct": {"f_form": "direct"},
    "state_only": {"features": "state"},
    "direct_state_only": {"f_form": "direct", "features": "state"},
    "position_only": {"features": "position"},
    "direct_position_only": {"f_form": "direct", "features": "position"},
    "gaussian": {"likelihood": "gaussian"},
    "moment": {"likelihood": "moment"},
    "linear": {"head_hidden": 0},
    "mlp256": {"head_hidden": 256},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-2": {"lr": 3e-2},
    "wd0": {"weight_decay": 0.0},
    "wd0.1": {"weight_decay": 0.1},
    "no_early_stop": {"patience": 0},
    "epochs5": {"max_epochs": 5},
    "last_k2": {"backbone_mode": "last_k", "last_k": 2},
    "lora": {"backbone_mode": "lora"},
    "learnt_end": {"f_end": "learnt"},
}


def recipe_options(name: str) -> dict[str, Any]:
    """A named recipe, or options written out: ``lr=1e-3&features=position``."""
    if "=" not in name:
        return RECIPES[name]
    def value(text: str) -> Any:
        try:
            return float(text) if any(c in text for c in ".e") and not text.isalpha() else yaml.safe_load(text)
        except ValueError:
            return yaml.safe_load(text)

    return {key: value(text) for key, text in (item.split("=", 1) for item in name.split("&"))}


def _val_f(export: str, pairs) -> np.ndarray:
    """f(t) of each validation pair at its split, from the exported scorer (as stage 3 would read it)."""
    from pipeline.importance import load

    scores = load(export).score([p.tolist() for p in pairs.prompt], [c.tolist() for c in pairs.completion])
    return np.array([float(s[t]) for s, t in zip(scores, pairs.split, strict=True)])


def cross_gains(export: str, train, val, binary: bool) -> dict[str, Any]:
    """The run's validation gain under each applicable likelihood, with a bootstrap CI over prompts.

    ``train`` gives each likelihood's constant; ``val`` may be any subset of the validation pairs."""
    from pipeline.importance.loss import LIKELIHOODS, best_constant_f
    from pipeline.importance.metrics import bootstrap_gain_ci

    def targets(pairs, mask=None) -> dict[str, torch.Tensor]:
        mask = np.ones(len(pairs), bool) if mask is None else mask
        return {k: torch.as_tensor(v[mask], dtype=torch.float64) for k, v in pairs.targets().items()}

    f = torch.as_tensor(_val_f(export, val), dtype=torch.float64)
    prompt_index = np.unique(val.prompt_id, return_inverse=True)[1]
    out = {}
    for name in [n for n in LIKELIHOODS if binary or n != "bernoulli"]:
        c = best_constant_f(name, targets(train, train.split > 0))
        baseline = torch.where(torch.as_tensor(val.split) > 0, c, 0.0).double()
        model_loss = LIKELIHOODS[name](f, targets(val)).numpy()
        base_loss = LIKELIHOODS[name](baseline, targets(val)).numpy()
        table = np.zeros((prompt_index.max() + 1, 3))
        np.add.at(table, prompt_index, np.column_stack([np.ones(len(f)), model_loss, base_loss]))
        out[name] = {"gain": float((base_loss - model_loss).mean()), "gain_ci95": list(bootstrap_gain_ci(table)),
                     "constant": c}
    zz = val.z1 * val.z2
    bins = np.minimum((val.split / np.array([len(c) for c in val.completion]) * 4).astype(int), 3)
    out["quartiles"] = [{"pairs": int((bins == q).sum()), "mean_f": float(f.numpy()[bins == q].mean()),
                         "mean_z1z2": float(zz[bins == q].mean())} for q in range(4) if (bins == q).any()]
    return out


def limit_training_splits(dump: Path, out: Path, max_split: int, seed: int) -> Path:
    """A copy of the dump whose *training* prompts keep only pairs split at t <= max_split (the others are
    flagged degenerate, so stage 2 skips them): what a stage-1 run with t_max = max_split would have
    given, with validation untouched, to measure f past the split limit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dump import read_dump
    from pipeline.importance.data import load_pairs, split_by_prompt

    _, val = split_by_prompt(load_pairs(dump, "reward", "prompt")[0], 0.1, seed)
    table = read_dump(dump)
    is_val = np.isin(table["prompt_id"].to_numpy(), np.unique(val.prompt_id))
    beyond = table["split_token_idx"].to_numpy() > max_split
    flagged = table["degenerate"].to_numpy() | (beyond & ~is_val)
    table = table.set_column(table.schema.get_field_index("degenerate"), "degenerate", pa.array(flagged))
    path = out / f"rollouts_tmax{max_split}" / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path.parent


def truth_errors(export: str, truth: str, n: int = 300, seed: int = 99) -> dict[str, Any]:
    """Per region (0, 1, 2 deciding tokens in the prefix): mean f, mean truth, MAE; and the edge error."""
    from pipeline.importance import load
    from tests.synthetic_dump import held_out

    data = held_out(n, seed, truth)
    f = torch.stack(load(export).score(data.prompts, data.completions)).numpy()
    region = np.rint(2 * data.f / data.f.max(1, keepdims=True)).astype(int)
    out = {f"region{r}": [float(f[region == r].mean()), float(data.f[region == r].mean()),
                          float(np.abs(f - data.f)[region == r].mean())] for r in range(3)}
    out["edge_mae"] = float(np.abs(f - data.f)[data.edges].mean())
    out["mean_f_by_t"] = f.mean(0).round(3).tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    from pipeline.importance.config import ImportanceArgs
    from pipeline.importance.data import load_pairs, split_by_prompt
    from pipeline.importance.loss import is_binary
    from pipeline.importance.model import FeatureCache
    from pipeline.importance.train import run

    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage2_recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=Path, help="a stage-1 dump")
    parser.add_argument("--truths", help="comma-separated synthetic truths instead of --rollouts")
    parser.add_argument("--reward_keys", default="reward", help="comma-separated reward columns to model")
    parser.add_argument("--recipes", default="default",
                        help=f"comma-separated: {', '.join(RECIPES)}, or options like lr=1e-3&features=position")
    parser.add_argument("--seeds", default="0", help="comma-separated: split seed (dump) or dump seed (truths)")
    parser.add_argument("--out_dir", type=Path, default=None, help="runs go here (default: a temporary dir)")
    parser.add_argument("--train_max_split", type=int, default=None,
                        help="train only on pairs split at t <= this (validation keeps all): f past the split limit")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rvg-recipes-"))
    torch.set_num_threads(1)
    jobs = []  # (dump, backbone, truth, seed)
    if args.truths:
        from pipeline.models import load_tokenizer
        from tests.synthetic_dump import write_synthetic_dump
        from tests.tiny_model import save_tiny_model

        backbone = out_dir / "tiny-llama"
        if not (backbone / "config.json").is_file():
            save_tiny_model(backbone)
        for truth in args.truths.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                dump = out_dir / f"{truth}-{seed}" / "rollouts_t" / "part-00000.parquet"
                if not dump.is_file():
                    write_synthetic_dump(dump, load_tokenizer(str(backbone)), str(backbone), truth=truth,
                                         n_prompts=128, groups_per_prompt=8, seed=seed)
                jobs.append((dump.parent, str(backbone), truth, 0))
    else:
        jobs = [(args.rollouts, None, None, int(s)) for s in args.seeds.split(",")]
        if args.train_max_split is not None:
            jobs = [(limit_training_splits(dump, out_dir / f"s{seed}", args.train_max_split, seed), b, t, seed)
                    for dump, b, t, seed in jobs]
    caches: dict[str, FeatureCache] = {}  # per dump and kind of row: pair keys are the same for every reward column and split
    for (dump, backbone, truth, seed), reward_key, name in itertools.product(
            jobs, args.reward_keys.split(","), args.recipes.split(",")):
        recipe = recipe_options(name)
        keep = "context" if recipe.get("features", ImportanceArgs.features) == "context" else "all"
        cache = caches.setdefault(f"{dump}:{keep}", FeatureCache(keep))
        t0 = time.time()
        result = run(ImportanceArgs(str(dump), backbone=backbone, reward_key=reward_key, seed=seed,
                                    out_dir=str(out_dir), run_name=f"{Path(dump).parent.name}-{reward_key}-{name}-s{seed}",
                                    report_examples=0, **recipe),
                     feature_cache=cache if recipe.get("backbone_mode", "frozen") == "frozen" else None)
        line = {"dump": str(dump), "truth": truth, "reward_key": reward_key, "recipe": name, "options": recipe,
                "seed": seed, "likelihood": result["likelihood"], "gain": result["gain"], "gain_ci95": result["gain_ci95"],
                "chosen": result["chosen"], "baseline_f": result["baseline_f"], "pairs": result["pairs"],
                "prompts": result["prompts"], "run_dir": result["run_dir"], "seconds": round(time.time() - t0)}
        if truth:
            line.update(truth_errors(result["export"], truth))
        else:
            pairs, _, column = load_pairs(dump, reward_key, "prompt")
            train, val = split_by_prompt(pairs, recipe.get("val_fraction", 0.1), seed)
            binary = is_binary(pairs.r1, pairs.r2)
            line["cross"] = cross_gains(result["export"], train, val, binary)
            if args.train_max_split is not None:
                line["beyond_max_split"] = cross_gains(result["export"], train,
                                                       val.subset(val.split > args.train_max_split), binary)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
