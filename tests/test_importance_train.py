"""Ground truth: trained through the CLI with the documented default recipe, the exported net recovers a known f.

Three truths (tests/synthetic_dump.py): deciding tokens at fixed positions with region-specific filler
(``regions``), at random positions among shared filler (``random_position``), and indistinguishable from
filler (``position_only``). Each dump: 128 prompts x 8 groups of 8 (4096 pairs). Tolerance, on 300
held-out sequences: mean absolute error <= 0.1 in each region (0, 1, 2 deciding tokens in the prefix)
and <= 0.2 at the t on both sides of each jump (reading f one token off would fail there).
"""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.importance import load
from pipeline.importance.config import ImportanceArgs
from pipeline.importance.model import FeatureCache
from pipeline.importance.train import _checkpoints, run
from pipeline.models import load_tokenizer
from tests.synthetic_dump import LENGTH, TRUTHS, held_out, write_synthetic_dump
from train_importance_net import main

REGION_MAE, EDGE_MAE = 0.1, 0.2


def truth_errors(export, truth: str, seed: int = 99, n: int = 300) -> dict[str, float]:
    """MAE per region (by the number of deciding tokens in the prefix) and at the edges of the jumps."""
    data = held_out(n, seed, truth)
    f = torch.stack(load(export).score(data.prompts, data.completions)).numpy()
    error = np.abs(f - data.f)
    region = np.rint(2 * data.f / data.f.max(1, keepdims=True)).astype(int)
    return {**{f"region {r}": float(error[region == r].mean()) for r in range(3)},
            "edges": float(error[data.edges].mean())}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a loaded 2-core machine 2 threads made this module 3x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(dump, *args: str):
    result = CliRunner().invoke(main, ["--rollouts", str(dump), *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """One default-recipe run per truth, trained on first use: {truth: (run_dir, CLI output)}."""
    runs = {}

    def get(truth: str):
        if truth not in runs:
            root = tmp_path_factory.mktemp(truth)
            dump = root / "synthetic" / "tiny" / "rollouts_gt" / "part-00000.parquet"
            write_synthetic_dump(dump, load_tokenizer(model_dir), model_dir, truth=truth, n_prompts=128,
                                 groups_per_prompt=8)
            result = _train(dump.parent, "--report_examples", "3")  # the report is output, not recipe
            runs[truth] = (dump.parents[1] / "importance_net" / "frozen-reward-prompt", result.output)
        return runs[truth]

    return get


@pytest.mark.parametrize("truth", list(TRUTHS))
def test_default_recipe_recovers_the_true_f(trained, truth):
    run_dir, _ = trained(truth)
    errors = truth_errors(run_dir / "export", truth)
    print(truth, {name: round(x, 3) for name, x in errors.items()})  # shown with pytest -s
    for name, mae in errors.items():
        assert mae <= (EDGE_MAE if name == "edges" else REGION_MAE), f"{truth}, {name}: MAE {mae:.3f}"


def test_gain_over_the_constant_with_its_ci(trained):
    run_dir, output = trained("regions")
    meta = json.loads((run_dir / "metadata.json").read_text())
    final, validation = meta["final"], meta["validation"]
    assert meta["likelihood"] == validation["likelihood"] == "gaussian"  # auto: the reward is not 0/1
    assert final["gain"] == pytest.approx(final["baseline_loss"] - final["loss"]) and final["gain"] > 0.15
    lo, hi = final["gain_ci95"]
    assert 0 < lo < final["gain"] < hi
    exported = json.loads((run_dir / "export" / "importance_net.json").read_text())["validation"]
    assert exported == validation and exported["gain_ci95"] == [lo, hi]
    assert {"likelihood", "gain", "gain_ci95", "pairs", "prompts"} <= set(exported)
    assert exported["prompts"] == meta["counts"]["prompts_val"] and exported["pairs"] == meta["counts"]["pairs_val"]
    assert f"wrote {run_dir}" in output
    assert f"gain {final['gain']:+.4f} nats/pair (95% CI {lo:+.4f}, {hi:+.4f} over {exported['prompts']} prompts" \
        in output


def test_run_directory_holds_every_artifact(trained):
    run_dir, _ = trained("regions")
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["status"] == "done" and meta["arguments"]["group_stats"] == "prompt"
    assert meta["counts"]["pairs_kept"] == meta["counts"]["pairs_train"] + meta["counts"]["pairs_val"]
    assert meta["counts"]["prompts_val"] == 13 and "torch" in meta["versions"]
    assert meta["tokenizer"] == meta["dump_metadata"]["tokenizer"]
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val = [r for r in rows if r["val/loss"]]
    assert [int(r["epoch"]) for r in val] == list(range(meta["epochs_trained"]))
    assert {"train/loss", "val/baseline_loss", "val/gain", "val/calibration_error"} <= set(rows[0])
    with (run_dir / "calibration.csv").open() as handle:
        calibration = list(csv.DictReader(handle))
    assert len(calibration) == meta["epochs_trained"] * 10
    for png in ("calibration.png", "f_by_position.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (run_dir / "export").iterdir()} == {"importance_net.json", "trainable.safetensors"}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    html = (run_dir / "report.html").read_text()
    assert html.count("<h3>") == 3 and html.count("class='t'") == 3 * LENGTH


def test_f_by_position_rises_through_the_completion(trained):
    run_dir, _ = trained("regions")
    table = json.loads((run_dir / "metadata.json").read_text())["final"]["f_by_position"]
    mean_f = [row["mean_f"] for row in table if row["count"]]
    assert max(mean_f[:3]) < 0.25 and min(mean_f[-2:]) > 0.9  # t <= 2 of 8: f ~ 0; t >= 6: f ~ 0.98


def test_a_binary_reward_is_fitted_by_its_exact_likelihood(model_dir, tmp_path):
    """0/1 rewards (here: both markers good) choose the Bernoulli likelihood, and the net beats the constant."""
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_b.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=64, groups_per_prompt=4, seed=3)
    table = pq.read_table(dump)
    binary = pc.cast(pc.greater(table["reward"], 1.5), pa.float64())
    pq.write_table(table.set_column(table.schema.get_field_index("reward"), "reward", binary), dump)
    output = _train(dump, "--report_examples", "0", "--run_name", "b").output
    run_dir = tmp_path / "synthetic" / "tiny" / "importance_net" / "b"
    validation = json.loads((run_dir / "export" / "importance_net.json").read_text())["validation"]
    assert validation["likelihood"] == "bernoulli" and "val bernoulli loss" in output
    assert validation["gain"] > 0.05 and validation["gain_ci95"][0] > 0


def test_never_worse_than_the_constant(model_dir, tmp_path):
    """A learning rate that wrecks every epoch: the constant (or the start) is kept, so the gain is >= 0."""
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_w.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=16, groups_per_prompt=2)
    _train(dump, "--report_examples", "0", "--run_name", "w", "--f_form", "direct", "--lr", "300",
           "--max_epochs", "2", "--weight_decay", "0")
    run_dir = tmp_path / "synthetic" / "tiny" / "importance_net" / "w"
    meta = json.loads((run_dir / "metadata.json").read_text())
    # the start is the constant too, equal to float rounding: either may be kept
    assert meta["chosen"] in ("constant", "initial") and meta["final"]["gain"] == pytest.approx(0.0, abs=1e-6)
    f = load(run_dir / "export").score([1, 90], [60, 250, 61])
    assert f.tolist() == pytest.approx([0.0, meta["baseline_f"], meta["baseline_f"], 1.0], abs=1e-6)


def test_runs_sharing_a_feature_cache(model_dir, tmp_path):
    """Several recipes on one dump share the frozen body's prefix states (the recipe benchmark); a
    position-only head neither reads nor fills that cache, a second state run computes nothing, and a
    context run needs a cache of its own kind."""
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_c.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=16, groups_per_prompt=2)
    cache = FeatureCache("all")
    common = {"rollouts": str(dump), "backbone": model_dir, "report_examples": 0, "max_epochs": 1}
    first = run(ImportanceArgs(run_name="states", features="state+position", **common), feature_cache=cache)
    cached = len(cache)
    assert cached > 0
    position = run(ImportanceArgs(run_name="position", features="position", **common), feature_cache=cache)
    again = run(ImportanceArgs(run_name="again", features="state+position", **common), feature_cache=cache)
    with pytest.raises(ValueError, match="cannot serve the context form"):
        run(ImportanceArgs(run_name="context", **common), feature_cache=cache)
    assert len(cache) == cached and position["gain"] >= 0 and again["loss"] == pytest.approx(first["loss"])
    metas = [json.loads((tmp_path / "synthetic" / "tiny" / "importance_net" / name / "metadata.json").read_text())
             for name in ("states", "position", "again")]
    assert [m["features_computed_rank0"] for m in metas] == [cached, 0, 0]


def test_config_resume_and_refusals(model_dir, tmp_path):
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_r.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=8, groups_per_prompt=1)
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"max-epochs": 2, "batch_size": 16, "run_name": "r", "report_examples": 0,
                                      "backbone_mode": "lora", "lora_r": 2}))  # batch_size: the old spelling
    started = _train(dump, "--config", str(config), "--resume")  # nothing to resume yet (a requeue before epoch 1)
    assert f"warning: 'batch_size' in '{config}' is deprecated: use per_device_train_batch_size" in started.stderr
    run_dir = tmp_path / "synthetic" / "tiny" / "importance_net" / "r"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(".lora_" in k or k.startswith("net.head.") for k in checkpoint["state_dict"])

    refused = CliRunner().invoke(main, ["--rollouts", str(dump), "--config", str(config)])
    assert refused.exit_code == 2 and "exists: pass --resume" in refused.stderr
    refused = CliRunner().invoke(main, ["--rollouts", str(dump), "--config", str(config), "--resume",
                                        "--group_stats", "group"])
    assert refused.exit_code == 2 and "--resume: group_stats differ" in refused.stderr

    meta_path = run_dir / "metadata.json"  # recorded as before the rename: the run still resumes
    meta = json.loads(meta_path.read_text())
    assert meta["arguments"]["per_device_train_batch_size"] == 16
    meta["arguments"]["batch_size"] = meta["arguments"].pop("per_device_train_batch_size")
    meta_path.write_text(json.dumps(meta))
    _train(dump, "--config", str(config), "--resume", "--max_epochs", "3")
    with (run_dir / "metrics.csv").open() as handle:
        epochs = [int(r["epoch"]) for r in csv.DictReader(handle) if r["val/loss"]]
    assert epochs == [0, 1, 2]
    assert json.loads((run_dir / "metadata.json").read_text())["epochs_trained"] == 3
    assert load(run_dir / "export").score([1, 90], [60, 250]).shape == (3,)
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # what Lightning saves on SLURM's SIGUSR1: newer, so resumed from
    hpc.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    assert _checkpoints(run_dir)[-1] == hpc


@pytest.mark.slow
def test_group_vs_prompt_statistics(model_dir, tmp_path):
    """Which --group_stats recovers f best (numbers for docs/importance.md): pooled prompt statistics.

    The plug-in caveat (docs/design.md section 2) predicts that the group's own statistics (G = 8) pull
    the middle region's f down (~0.29 for 0.5).
    """
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_c.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=128, groups_per_prompt=4, seed=1)
    data = held_out(300, 99, "regions")
    middle = np.rint(2 * data.f / data.f.max(1, keepdims=True)) == 1
    mean_f = {}
    for stats in ("group", "prompt"):
        _train(dump, "--group_stats", stats, "--report_examples", "0")
        export = tmp_path / "synthetic" / "tiny" / "importance_net" / f"frozen-reward-{stats}" / "export"
        mean_f[stats] = float(torch.stack(load(export).score(data.prompts, data.completions)).numpy()[middle].mean())
        print(stats, round(mean_f[stats], 3), truth_errors(export, "regions"))
    truth = float(data.f[middle].mean())
    assert mean_f["group"] < mean_f["prompt"] - 0.1 and abs(mean_f["prompt"] - truth) < 0.1
