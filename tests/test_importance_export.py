"""The network's f(t) alignment, batching, the export round trip (in this process and another), load errors."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.dump import tokenizer_fingerprint
from pipeline.errors import UserError
from pipeline.importance import ImportanceScorer, load
from pipeline.importance.export import CONFIG_FILE, FORMAT_VERSION, save_export
from pipeline.importance.loss import F_MAX
from pipeline.importance.model import ImportanceNet, NetConfig
from pipeline.importance.report import Example, token_pieces, write_report
from pipeline.models import load_tokenizer

PROMPTS = [[5, 6, 7, 1, 90], [9, 1, 90], [11, 12, 13, 14, 15, 16, 1, 90]]
COMPLETIONS = [[60, 61, 250, 70], [], [80, 81, 82, 83, 84, 85, 86]]


def _net(model_dir, mode: str = "frozen", seed: int = 0, head_hidden: int = 0, **kwargs) -> ImportanceNet:
    """A network (linear head unless ``head_hidden``) whose trainable weights are random (not the init), so a
    lost weight shows up in the scores."""
    kwargs.setdefault("features", "state+position")  # the heads read one token at a time: tests/test_context_head.py
    net = ImportanceNet(NetConfig(str(model_dir), backbone_mode=mode, head_hidden=head_hidden, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_state_dict().values():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return net.eval()


def _info(model_dir) -> dict:
    return {"tokenizer": tokenizer_fingerprint(load_tokenizer(str(model_dir))), "reward_key": "reward",
            "group_stats": "prompt", "likelihood": "gaussian", "baseline_f": 0.3,
            "validation": {"likelihood": "gaussian", "gain": 0.1, "gain_ci95": [0.05, 0.15], "pairs": 10,
                           "prompts": 3}}


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return ImportanceScorer(_net(tiny_model_dir, head_hidden=8), _info(tiny_model_dir))


def _plain_f(net: ImportanceNet, prompt: list[int], completion: list[int], t: int) -> float:
    """f(t) from a separate plain forward of prompt + completion[:t] (no cache, no batching)."""
    ids = torch.tensor([prompt + completion[:t]])
    hidden = net.body(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, len(prompt):]
    u = torch.arange(1, t + 1).unsqueeze(0)
    return float(net.inner_f(hidden, u)[0, -1].detach())


@pytest.mark.parametrize("form", ["direct", "monotone"])
def test_f_t_is_read_at_the_last_token_of_prompt_plus_prefix(tiny_model_dir, form):
    """Scoring the whole completion equals a separate forward on each truncated input; the ends are pinned."""
    scorer = ImportanceScorer(_net(tiny_model_dir, form=form), _info(tiny_model_dir))
    prompt, completion = PROMPTS[0], COMPLETIONS[0]
    f = scorer.score(prompt, completion)
    assert f.shape == (len(completion) + 1,)
    assert f[0].item() == 0.0 and f[-1].item() == 1.0
    for t in range(1, len(completion)):
        assert f[t].item() == pytest.approx(_plain_f(scorer.net, prompt, completion, t), abs=1e-5)
    inner = f[1:-1]
    assert ((inner >= 0) & (inner <= F_MAX)).all() and inner.std() > 1e-3  # the random head gives varying f
    if form == "monotone":
        assert (f[1:] >= f[:-1]).all()


def test_increments_sum_to_one_per_completion(scorer):
    """The anchored ends: delta's weights f(t+1) - f(t) distribute all of each completion's reward variance."""
    padded = scorer.score_padded(PROMPTS, COMPLETIONS, width=9)
    increments = padded[:, 1:] - padded[:, :-1]
    for row, completion in enumerate(COMPLETIONS):
        if completion:  # an empty completion has no token to give weight to: f = 0 throughout
            assert increments[row].sum().item() == pytest.approx(1.0, abs=1e-6)
            assert padded[row, len(completion)].item() == 1.0
    assert padded[:, 0].eq(0).all()


def test_learnt_end_is_read_from_the_head(tiny_model_dir):
    scorer = ImportanceScorer(_net(tiny_model_dir, pin_end=False), _info(tiny_model_dir))
    f = scorer.score(PROMPTS[0], COMPLETIONS[0])
    assert f[0].item() == 0.0 and 0 < f[-1].item() < F_MAX + 1e-6
    assert f[-1].item() == pytest.approx(_plain_f(scorer.net, PROMPTS[0], COMPLETIONS[0], len(COMPLETIONS[0])), abs=1e-5)


def test_a_group_scored_with_its_prompt_once_equals_row_by_row(scorer):
    """Stage 3's call: each prompt repeated for its G completions; the shared-prompt KV cache changes no f."""
    rng = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for prompt in PROMPTS:
        for _ in range(4):
            prompts.append(prompt)
            completions.append(torch.randint(60, 90, (int(torch.randint(0, 9, (1,), generator=rng)),),
                                             generator=rng).tolist())
    batched = scorer.score_padded(prompts, completions, batch_size=16)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        alone = scorer.score(prompt, completion)
        torch.testing.assert_close(batched[row, : len(completion) + 1], alone, atol=1e-5, rtol=0)
        for t in range(1, len(completion)):
            assert alone[t].item() == pytest.approx(_plain_f(scorer.net, prompt, completion, t), abs=1e-5)


def test_batched_scores_match_one_at_a_time(scorer):
    batched = scorer.score(PROMPTS, COMPLETIONS, batch_size=2)
    assert [len(f) for f in batched] == [len(c) + 1 for c in COMPLETIONS]
    for prompt, completion, f in zip(PROMPTS, COMPLETIONS, batched, strict=True):
        torch.testing.assert_close(f, scorer.score(torch.tensor(prompt), torch.tensor(completion, dtype=torch.long)),
                                   atol=1e-5, rtol=0)


def test_score_padded_repeats_the_last_value(scorer):
    padded = scorer.score_padded(PROMPTS, COMPLETIONS, width=9)
    assert padded.shape == (3, 10)
    assert (padded[1] == 0).all()  # empty completion: f(0) everywhere, so every delta is 0
    assert (padded[0, len(COMPLETIONS[0]):] == 1).all()  # past the end f stays at f(len)
    torch.testing.assert_close(padded[0, :5], scorer.score(PROMPTS[0], COMPLETIONS[0]))
    with pytest.raises(ValueError, match="longer than width"):
        scorer.score_padded(PROMPTS, COMPLETIONS, width=3)


@pytest.mark.parametrize(("mode", "extra"), [("frozen", {}), ("last_k", {"last_k": 1}), ("lora", {"lora_r": 2}),
                                             ("frozen", {"features": "context", "head_hidden": 8})])
def test_export_round_trip(tiny_model_dir, tmp_path, mode, extra):
    net = _net(tiny_model_dir, mode, seed=1, **extra)
    before = ImportanceScorer(net, _info(tiny_model_dir)).score(PROMPTS, COMPLETIONS)
    path = save_export(net, tmp_path / "export", **_info(tiny_model_dir))
    loaded = load(path)
    assert loaded.tokenizer_fingerprint == _info(tiny_model_dir)["tokenizer"]
    assert (loaded.reward_key, loaded.group_stats, loaded.backbone) == ("reward", "prompt", str(tiny_model_dir))
    assert loaded.validation == _info(tiny_model_dir)["validation"]
    for a, b in zip(before, loaded.score(PROMPTS, COMPLETIONS), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    if mode == "frozen" and not extra:
        assert json.loads((path / CONFIG_FILE).read_text())["net"]["backbone_mode"] == "frozen"
        assert sorted(net.trainable_state_dict()) == ["head.bias", "head.weight"]


def test_a_constant_export_scores_the_constant_inside_pinned_ends(tiny_model_dir, tmp_path):
    """What stage 2 exports when no trained epoch beat the constant on validation."""
    net = _net(tiny_model_dir)
    net.config.constant = 0.3
    f = load(save_export(net, tmp_path / "export", **_info(tiny_model_dir))).score(PROMPTS[0], COMPLETIONS[0])
    assert f.tolist() == pytest.approx([0.0, 0.3, 0.3, 0.3, 1.0])


@pytest.mark.slow  # a fresh interpreter imports torch + transformers + lightning: ~10-30 s
def test_export_loads_in_another_process(tiny_model_dir, tmp_path):
    net = _net(tiny_model_dir, seed=2)
    path = save_export(net, tmp_path / "export", **_info(tiny_model_dir))
    expected = ImportanceScorer(net, _info(tiny_model_dir)).score(PROMPTS[0], COMPLETIONS[0])
    code = ("import sys, pipeline.importance as imp; "
            f"print(imp.load(sys.argv[1]).score({PROMPTS[0]}, {COMPLETIONS[0]}).tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected.tolist(), abs=1e-6)


def test_load_refuses_what_is_not_a_matching_export(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not an importance-net export"):
        load(tmp_path)
    path = save_export(_net(tiny_model_dir), tmp_path / "export", **_info(tiny_model_dir))
    config = json.loads((path / CONFIG_FILE).read_text())
    config["tokenizer"]["vocab_sha256"] = "0" * 16
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match="backbone changed since training"):
        load(path)
    config["format"] = FORMAT_VERSION - 1
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match="has export format 1, this code reads 2"):
        load(path)


def test_report_colours_each_token_by_its_delta(scorer, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer.encode("héllo 12 + 7")
    assert "".join(token_pieces(tokenizer, ids)).replace("Ã©", "é") == "héllo 12 + 7"
    examples = [Example(p, c, 1.0) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    html = write_report(scorer, tokenizer, examples, tmp_path / "report.html").read_text()
    f = scorer.score(PROMPTS[0], COMPLETIONS[0])
    assert html.count("<h3>") == 3 and html.count("class='t'") == sum(map(len, COMPLETIONS))
    assert f"f {f[0]:.3f} &rarr; {f[1]:.3f} ({f[1] - f[0]:+.3f})" in html
    assert "rgba(220,50,47,1.000)" in html or "rgba(38,139,210,1.000)" in html  # the largest |delta| is full colour


def test_export_is_readable_by_others(tiny_model_dir, tmp_path):
    path = save_export(_net(tiny_model_dir), tmp_path / "export", **_info(tiny_model_dir))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o666 & ~umask}


def test_position_only_features_give_every_completion_the_same_curve(tiny_model_dir):
    scorer = ImportanceScorer(_net(tiny_model_dir, features="position"), _info(tiny_model_dir))
    a, b = scorer.score([PROMPTS[0], PROMPTS[2]], [[60, 61, 250, 70, 71], [80, 81, 82, 83, 84]])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a[1:-1] > 0).all() and a[-1].item() == 1.0


def test_head_stays_fp32_under_mixed_precision(tiny_model_dir):
    """Under bf16 autocast (``--precision bf16-mixed``) the head still computes in fp32: same f to 1e-6."""
    net = _net(tiny_model_dir, head_hidden=8)
    states = torch.randn(2, 5, net.body.config.hidden_size)
    u = torch.arange(1, 6).expand(2, 5)
    plain = net.logits(states, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net.logits(states, u)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=1e-6, rtol=0)
