"""Ground truth: trained through the CLI on a dump whose true f(t) is known, the exported net recovers it.

Truth (tests/synthetic_dump.py): f = 0 for t <= K1, ~0.49 for K1 < t <= K2, ~0.98 after. Tolerance,
on 300 held-out sequences, boundaries included (reading f(t) one token off would fail): mean
absolute error <= 0.15 before K1 and after K2, <= 0.25 in between (an interior value, the
noisiest to estimate: measured 0.07-0.14 over dump seeds), and a validation NLL at least 0.15
nats/pair below the best constant f.
"""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.importance import load
from pipeline.importance.train import _checkpoints
from pipeline.models import load_tokenizer
from tests.synthetic_dump import K1, K2, LENGTH, held_out, true_f, write_synthetic_dump
from train_importance_net import main

TOLERANCE = {"before K1": 0.15, "between": 0.25, "after K2": 0.15}
REGIONS = {"before K1": slice(0, K1 + 1), "between": slice(K1 + 1, K2 + 1), "after K2": slice(K2 + 1, LENGTH + 1)}
FIT = ["--max_epochs", "20", "--batch_size", "128", "--lr", "0.05", "--val_fraction", "0.25"]


def region_errors(export, seed: int = 99, n: int = 300) -> dict[str, tuple[float, float, float]]:
    """Per region: (mean predicted f, mean true f, mean absolute error) on fresh sequences."""
    data = held_out(n, seed)
    f = torch.stack(load(export).score(data.prompts, data.completions)).numpy()
    truth = np.array([[true_f(p, t) for t in range(LENGTH + 1)] for p in data.p])
    return {name: (float(f[:, s].mean()), float(truth[:, s].mean()), float(np.abs(f[:, s] - truth[:, s]).mean()))
            for name, s in REGIONS.items()}


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
def ground_truth(model_dir, tmp_path_factory):
    dump = tmp_path_factory.mktemp("gt") / "synthetic" / "tiny" / "rollouts_gt" / "part-00000.parquet"
    write_synthetic_dump(dump, load_tokenizer(model_dir), model_dir, n_prompts=64, groups_per_prompt=8)
    result = _train(dump.parent, "--group_stats", "prompt", "--report_examples", "3", *FIT)
    return dump.parents[1] / "importance_net" / "frozen-reward-prompt", result.output


def test_exported_net_recovers_the_true_f(ground_truth):
    run_dir, _ = ground_truth
    errors = region_errors(run_dir / "export")
    print({name: tuple(round(x, 3) for x in v) for name, v in errors.items()})  # shown with pytest -s
    for name, (mean_f, mean_truth, mae) in errors.items():
        assert mae <= TOLERANCE[name], f"{name}: mean f {mean_f:.3f} vs truth {mean_truth:.3f}, MAE {mae:.3f}"


def test_val_nll_beats_the_constant_baseline(ground_truth):
    run_dir, output = ground_truth
    final = json.loads((run_dir / "metadata.json").read_text())["final"]
    assert final["nll"] < final["baseline_nll"] - 0.15
    assert final["gain"] == pytest.approx(final["baseline_nll"] - final["nll"])
    assert f"wrote {run_dir}" in output and "gain +" in output


def test_run_directory_holds_every_artifact(ground_truth):
    run_dir, _ = ground_truth
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["status"] == "done" and meta["arguments"]["group_stats"] == "prompt"
    assert meta["counts"]["pairs_kept"] == meta["counts"]["pairs_train"] + meta["counts"]["pairs_val"]
    assert meta["counts"]["prompts_val"] == 16 and "torch" in meta["versions"]
    assert meta["tokenizer"] == meta["dump_metadata"]["tokenizer"]
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val = [r for r in rows if r["val/nll"]]
    assert [int(r["epoch"]) for r in val] == list(range(20))
    assert {"train/nll", "val/baseline_nll", "val/gain", "val/calibration_error"} <= set(rows[0])
    with (run_dir / "calibration.csv").open() as handle:
        calibration = list(csv.DictReader(handle))
    assert len(calibration) == 20 * 10
    for png in ("calibration.png", "f_by_position.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (run_dir / "export").iterdir()} == {"importance_net.json", "trainable.safetensors"}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    html = (run_dir / "report.html").read_text()
    assert html.count("<h3>") == 3 and html.count("class='t'") == 3 * LENGTH


def test_f_by_position_rises_through_the_completion(ground_truth):
    run_dir, _ = ground_truth
    table = json.loads((run_dir / "metadata.json").read_text())["final"]["f_by_position"]
    mean_f = [row["mean_f"] for row in table if row["count"]]
    assert max(mean_f[:3]) < 0.25 and min(mean_f[-2:]) > 0.9  # t <= 2 of 8: f ~ 0; t >= 6: f ~ 0.98


def test_config_resume_and_refusals(model_dir, tmp_path):
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_r.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=8, groups_per_prompt=1)
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"max-epochs": 2, "batch_size": 16, "run_name": "r", "report_examples": 0,
                                      "backbone_mode": "lora", "lora_r": 2}))
    _train(dump, "--config", str(config), "--resume")  # nothing to resume yet (a requeue before epoch 1): starts
    run_dir = tmp_path / "synthetic" / "tiny" / "importance_net" / "r"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(".lora_" in k or k.startswith("net.head.") for k in checkpoint["state_dict"])

    refused = CliRunner().invoke(main, ["--rollouts", str(dump), "--config", str(config)])
    assert refused.exit_code == 2 and "exists: pass --resume" in refused.stderr
    refused = CliRunner().invoke(main, ["--rollouts", str(dump), "--config", str(config), "--resume",
                                        "--group_stats", "group"])
    assert refused.exit_code == 2 and "--resume: group_stats differ" in refused.stderr

    _train(dump, "--config", str(config), "--resume", "--max_epochs", "3")
    with (run_dir / "metrics.csv").open() as handle:
        epochs = [int(r["epoch"]) for r in csv.DictReader(handle) if r["val/nll"]]
    assert epochs == [0, 1, 2]
    assert json.loads((run_dir / "metadata.json").read_text())["epochs_trained"] == 3
    assert load(run_dir / "export").score([1, 90], [60, 250]).shape == (3,)
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # what Lightning saves on SLURM's SIGUSR1: newer, so resumed from
    hpc.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    assert _checkpoints(run_dir)[-1] == hpc


@pytest.mark.slow
def test_group_vs_prompt_statistics(model_dir, tmp_path):
    """Which --group_stats recovers f best (numbers for docs/importance.md): pooled prompt statistics.

    Section 1's caveat predicts the group plug-in (G = 8) pulls the middle region's f down (~0.29 for 0.5).
    """
    dump = write_synthetic_dump(tmp_path / "synthetic" / "tiny" / "rollouts_c.parquet", load_tokenizer(model_dir),
                                model_dir, n_prompts=128, groups_per_prompt=4, seed=1)
    errors = {}
    for stats in ("group", "prompt"):
        _train(dump, "--group_stats", stats, "--report_examples", "0", *FIT)
        errors[stats] = region_errors(tmp_path / "synthetic" / "tiny" / "importance_net" / f"frozen-reward-{stats}"
                                      / "export")
        print(stats, {k: tuple(round(x, 3) for x in v) for k, v in errors[stats].items()})
    assert errors["prompt"]["between"][2] < errors["group"]["between"][2]
    assert errors["group"]["between"][0] < errors["prompt"]["between"][0]
    assert all(errors["prompt"][name][2] <= TOLERANCE[name] for name in REGIONS)
