"""The study's controls: the ``shuffled`` soft mask and stage 3's importance-gain guard."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.grpo.importance_guard import check_importance_gain, gain_is_positive
from pipeline.grpo.softmask import SOFTMASKS, soft_mask_weights
from pipeline.importance.export import CONFIG_FILE
from tests.test_stage3 import FAST, make_export
from train_grpo_softmask import main


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.tensor([[1.0] * 7 + [0.0] * 3, [1.0] * 10, [1.0] * 3 + [0.0] * 7])
    f = torch.rand(3, 11).cumsum(-1) / 11  # increasing, so delta's weights are all > 0 and distinct
    return mask, f


def test_shuffled_permutes_delta_within_each_completion():
    mask, f = _batch()
    delta = SOFTMASKS["delta"](mask, f, None, 0.2) * mask
    torch.manual_seed(3)
    shuffled = SOFTMASKS["shuffled"](mask, f, None, 0.2)
    assert torch.all(shuffled[mask == 0] == 0), "nothing moves onto padding"
    for row in range(3):
        valid = mask[row].bool()
        assert torch.equal(shuffled[row][valid].sort().values, delta[row][valid].sort().values)
    assert not torch.equal(shuffled, delta), "the weights land on other tokens"
    torch.manual_seed(3)
    assert torch.equal(SOFTMASKS["shuffled"](mask, f, None, 0.2), shuffled), "the seed decides the permutation"
    final = soft_mask_weights("shuffled", mask, f=f)
    assert torch.allclose((final * mask).sum(-1) / mask.sum(-1), torch.ones(3)), "mean 1 per completion, as delta"


@pytest.mark.parametrize("evidence, positive", [
    ({"gain": 0.02, "gain_ci95": [0.004, 0.03]}, True),
    ({"gain": 0.02}, True),  # no CI recorded: the point estimate decides
    ({"gain": 0.0001, "gain_ci95": [-0.002, 0.002]}, False),  # the demo's case: noise around 0
    ({"gain": -0.004, "gain_ci95": [-0.01, 0.001]}, False),
    (None, False),
])
def test_gain_counts_as_positive_only_when_its_ci_is(evidence, positive):
    assert gain_is_positive(evidence) is positive


def _export_with_gain(tiny_model_dir, path, gain):
    export = make_export(tiny_model_dir, path)
    info = json.loads((export / CONFIG_FILE).read_text())
    if gain is not None:
        info["validation"] = {"likelihood": -2.5, "gain": gain, "gain_ci95": [gain - 0.01, gain + 0.01],
                              "pairs": 40, "prompts": 4}
    (export / CONFIG_FILE).write_text(json.dumps(info))
    return export


def test_guard_is_silent_for_masks_that_read_no_f(tmp_path):
    assert check_importance_gain("entropy", str(tmp_path), require=True) is None


def test_a_net_without_gain_is_warned_about_and_recorded(tiny_model_dir, tmp_path, caplog):
    export = _export_with_gain(tiny_model_dir, tmp_path / "export", gain=-0.003)
    args = ["--model_name", str(tiny_model_dir), *FAST, "--softmask", "delta", "--importance_net", str(export),
            "--max_steps", "1", "--eval_every", "1", "--out_dir", str(tmp_path / "out"), "--run_name", "r"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "weights are noise" in r.getMessage()]
    assert len(warnings) == 1 and "gain -0.0030 nats/pair [95% CI -0.0130, +0.0070] over 40 pairs" in warnings[0]
    meta = json.loads((tmp_path / "out/arithmetic/tiny-llama/grpo/r/metadata.json").read_text())
    check = meta["importance_check"]
    assert check["gain_above_zero"] is False and check["validation"]["gain"] == -0.003 and "noise" in check["warning"]


@pytest.mark.parametrize("gain", [-0.003, 0.0, None])
def test_require_importance_gain_refuses_such_a_net(gain, tiny_model_dir, tmp_path):
    export = _export_with_gain(tiny_model_dir, tmp_path / "export", gain=gain)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), *FAST, "--softmask", "shuffled",
                                       "--importance_net", str(export), "--require_importance_gain",
                                       "--out_dir", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: importance net") and "noise" in lines[0]
    assert not out.exists(), "refused before writing anything"


def test_require_importance_gain_accepts_a_net_that_learnt(tiny_model_dir, tmp_path):
    export = _export_with_gain(tiny_model_dir, tmp_path / "export", gain=0.05)
    record = check_importance_gain("delta", str(export), require=True)
    assert record["gain_above_zero"] is True and "warning" not in record
