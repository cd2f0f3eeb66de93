"""Realistic mistakes across the three CLIs: each exits with code 2 and one line on stderr that names the fix,
with no traceback, and leaves the whole output tree (an existing dump, a stage-3 run with a checkpoint, the
inputs) byte for byte as it was. Most fail at parse time, before any model loads."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import generate_paired_rollouts
import train_grpo_softmask
import train_importance_net
from pipeline.models import load_tokenizer
from tests.file_tree import tree_digest
from tests.synthetic_dump import write_synthetic_dump

CLIS = {"stage1": generate_paired_rollouts.main, "stage2": train_importance_net.main,
        "stage3": train_grpo_softmask.main}
GPU = torch.cuda.is_available()


class _CurrentStderr(logging.Handler):
    """Log records to whatever sys.stderr is now (CliRunner swaps it), as the CLIs' basicConfig does."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@pytest.fixture(scope="module")
def world(tiny_model_dir, other_tokenizer_model_dir, tmp_path_factory):
    """An output tree as a user has it: a finished stage-1 dump, a stage-3 run with a checkpoint, inputs."""
    root = tmp_path_factory.mktemp("world")
    out = root / "out"
    stage1 = _stage1_base(tiny_model_dir, out)
    result = CliRunner().invoke(generate_paired_rollouts.main, stage1, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stage3 = [*_stage3_base(tiny_model_dir, out), "--run_name", "r", "--save_every", "1"]
    result = CliRunner().invoke(train_grpo_softmask.main, stage3, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = out / "arithmetic" / "tiny-llama" / "grpo" / "r"
    broken_run = run.with_name("broken")
    shutil.copytree(run, broken_run)
    (checkpoint,) = (broken_run / "checkpoints").glob("*.ckpt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])

    dump = out / "arithmetic" / "tiny-llama" / "rollouts_t"
    shutil.copytree(dump, dump.with_name("rollouts_badconfig"))
    (dump.with_name("rollouts_badconfig") / "run_config.json").write_text("{")
    shutil.copytree(dump, dump.with_name("rollouts_badpart"))
    part = dump.with_name("rollouts_badpart") / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    inputs = root / "inputs"
    truncated_dump = inputs / "truncated_dump"
    shutil.copytree(dump, truncated_dump)
    part = truncated_dump / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-40])
    (inputs / "empty_dir").mkdir()
    (inputs / "rollouts.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    (inputs / "first_part_truncated.parquet").write_bytes((dump / "part-00000.parquet").read_bytes()[:200])
    (inputs / "words_level.jsonl").write_text('{"question": "1+1", "answer": "2", "level": "easy"}\n')
    (inputs / "fractional_level.jsonl").write_text('{"question": "1+1", "answer": "2", "level": 0.5}\n')
    (inputs / "no_answer.jsonl").write_text('{"question": "1+1"}\n')
    (inputs / "not_a_model").mkdir()
    (inputs / "a_file").write_text("x")
    (inputs / "broken.yaml").write_text("group_size: [\n")
    (inputs / "unknown_key.yaml").write_text("group_sise: 4\n")
    (inputs / "a_list.yaml").write_text("- group_size\n")
    (inputs / "bad_value.yaml").write_text("per_device_generation_batch_size: four\n")
    (inputs / "twice.yaml").write_text("group_size: 4\nnum_generations: 4\n")
    synthetic = write_synthetic_dump(root / "out" / "synthetic" / "tiny" / "rollouts_s" / "part-00000.parquet",
                                     load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir), n_prompts=6,
                                     groups_per_prompt=1)
    runs = synthetic.parents[1] / "importance_net"
    (runs / "done" / "export").mkdir(parents=True)
    for name, metadata in (("seed0", '{"arguments": {"seed": 0}}'), ("badmeta", "{")):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"not read before the check")
        (runs / name / "metadata.json").write_text(metadata)
    return {"root": root, "out": out, "model": tiny_model_dir, "other_model": other_tokenizer_model_dir,
            "inputs": inputs, "synthetic": synthetic.parent}


def _stage1_base(model: Path, out: Path) -> list[str]:
    return ["--model_name", str(model), "--task_name", "arithmetic", "--levels", "0,1", "--num_prompts", "2",
            "--group_size", "2", "--max_new_tokens", "4", "--prompts_per_chunk", "1", "--out_dir", str(out),
            "--tag", "t"]


def _stage3_base(model: Path, out: Path) -> list[str]:
    return ["--model_name", str(model), "--task_name", "arithmetic", "--levels", "0,1", "--prompts_per_step", "2",
            "--group_size", "2", "--max_new_tokens", "4", "--eval_prompts", "1", "--num_train_prompts", "4",
            "--max_steps", "1", "--out_dir", str(out)]


def _expand(world: dict, args: list[str]) -> list[str]:
    """{model}, {out}, {inputs}, ... in a case's arguments -> the world's paths."""
    expanded = []
    for arg in args:
        for name, value in world.items():
            arg = arg.replace(f"{{{name}}}", str(value))
        expanded.append(arg)
    return expanded


def invoke_and_check(world: dict, stage: str, args: list[str], pattern: str) -> str:
    """Run one bad call in-process, with logging and every warning shown as a fresh process would show them."""
    base = {"stage1": _stage1_base(world["model"], world["out"]),
            "stage2": ["--rollouts", str(world["synthetic"])],
            "stage3": [*_stage3_base(world["model"], world["out"]), "--run_name", "fresh"]}[stage]
    before = tree_digest(world["root"])
    root = logging.getLogger()
    handler, level = _CurrentStderr(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(CLIS[stage], [*base, *_expand(world, args)])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not caught, [str(w.message) for w in caught]
    assert tree_digest(world["root"]) == before, "a failing call changed the output tree"
    return lines[0]


def case(stage: str, args: str | list[str], pattern: str, *marks) -> pytest.param:
    args = args.split() if isinstance(args, str) else args
    return pytest.param(stage, args, pattern, id=f"{stage}:{' '.join(args)}"[:90], marks=marks)


NEEDS_CPU_ONLY = pytest.mark.skipif(GPU, reason="the refusal is about running without a GPU")
NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed")
NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed")
RANGE = r"is not in the range"

STAGE1 = [
    case("stage1", "--group_size 3", r"--group_size must be even"),
    case("stage1", "--group_size 0", rf"'--group_size': 0 {RANGE} x>=2"),
    case("stage1", "--num_generations 1", rf"'--group_size': 1 {RANGE}"),
    case("stage1", "--num_prompts 0", rf"'--num_prompts': 0 {RANGE} x>=1"),
    case("stage1", "--num_prompts -3", rf"'--num_prompts': -3 {RANGE}"),
    case("stage1", "--num_prompts many", r"'--num_prompts': 'many' is not a valid integer"),
    case("stage1", "--groups_per_prompt 0", rf"'--groups_per_prompt': 0 {RANGE}"),
    case("stage1", "--max_new_tokens 0", rf"'--max_new_tokens': 0 {RANGE}"),
    case("stage1", "--max_completion_length -1", rf"'--max_new_tokens': -1 {RANGE}"),
    case("stage1", "--temperature -1", rf"'--temperature': -1.0 {RANGE} x>=0"),
    case("stage1", "--temperature nan", r"'--temperature': 'nan' is not a finite number"),
    case("stage1", "--top_p 0", rf"'--top_p': 0.0 {RANGE} 0<x<=1"),
    case("stage1", "--top_p 1.5", rf"'--top_p': 1.5 {RANGE}"),
    case("stage1", "--split_quantile -0.1", rf"'--split_quantile': -0.1 {RANGE} 0<=x<=1"),
    case("stage1", "--split_quantile 2", rf"'--split_quantile': 2.0 {RANGE}"),
    case("stage1", "--max_split_tokens -1", rf"'--max_split_tokens': -1 {RANGE}"),
    case("stage1", "--prompts_per_chunk 0", rf"'--prompts_per_chunk': 0 {RANGE}"),
    case("stage1", "--per_device_generation_batch_size 0", rf"'--per_device_generation_batch_size': 0 {RANGE}"),
    case("stage1", "--seed -1", rf"'--seed': -1 {RANGE} x>=0"),
    case("stage1", ["--levels", ""], r"'--levels': give at least one level"),
    case("stage1", "--levels a,b", r"'--levels': 'a,b': give comma-separated integers"),
    case("stage1", "--levels -1", r"'--levels': '-1': levels are integers >= 0"),
    case("stage1", "--levels 0,9", r"task 'arithmetic' has no level\(s\) \[9\]: choose from"),
    case("stage1", "--task_name nosuchtask", r"unknown task 'nosuchtask': choose one of"),
    case("stage1", "--task_name {inputs}/missing.jsonl", r"cannot read dataset '.*missing.jsonl'"),
    case("stage1", "--task_name {inputs}/words_level.jsonl", r"column 'level' must hold integers"),
    case("stage1", "--task_name {inputs}/fractional_level.jsonl", r"column 'level' must hold integers"),
    case("stage1", "--task_name {inputs}/no_answer.jsonl", r"reward 'correct' needs column\(s\) answer"),
    case("stage1", "--model_name ./no/such/model", r"model './no/such/model' not found"),
    case("stage1", "--model_name {inputs}/not_a_model", r"has no config.json: pass an HF model directory"),
    case("stage1", "--rewards correct=1,bogus=2", r"unknown reward\(s\) bogus"),
    case("stage1", "--rewards correct=abc", r"'correct=abc' is not name=weight"),
    case("stage1", "--rewards hybrid=1 --overwrite", r"--rewards hybrid needs --reward_model"),
    case("stage1", "--rewards hybrid=1 --reward_model /no/such/rm", r"--reward_model: model '/no/such/rm' not found"),
    case("stage1", "--reward_model {model}", r"--reward_model is only used by the hybrid reward"),
    case("stage1", "--backend vllm --overwrite", r"--backend vllm needs vLLM", NO_VLLM),
    case("stage1", "--backend foo", r"'--backend': 'foo' is not one of"),
    case("stage1", "--tensor_parallel_size 0", rf"'--tensor_parallel_size': 0 {RANGE}"),
    case("stage1", "--gpu_memory_utilization 0", rf"'--gpu_memory_utilization': 0.0 {RANGE}"),
    case("stage1", "--gpu_memory_utilization 1.5", rf"'--gpu_memory_utilization': 1.5 {RANGE}"),
    case("stage1", "--max_model_len 0", rf"'--max_model_len': 0 {RANGE}"),
    case("stage1", "--dtype float8", r"'--dtype': 'float8' is not one of"),
    case("stage1", "--shard_index 2 --num_shards 2", r"--shard_index must be in \[0, --num_shards\)"),
    case("stage1", "--num_shards 0", rf"'--num_shards': 0 {RANGE}"),
    case("stage1", "--shard_index -1", rf"'--shard_index': -1 {RANGE}"),
    case("stage1", "--num_shards 3 --shard_index 2", r"shard 2 of 3 has no chunk: .*lower --num_shards"),
    case("stage1", "--tag ../escape", r"'--tag': '../escape' must be a plain directory name"),
    case("stage1", "--tag .hidden", r"'--tag': '.hidden' must be a plain directory name"),
    case("stage1", "--out_dir {inputs}/a_file/sub", r"pass a writable --out_dir"),
    case("stage1", "--seed 1", r"holds a dump made with other arguments: pass --overwrite or another --tag"),
    case("stage1", "--seed 1 --rewards hybrid=1 --overwrite", r"--rewards hybrid needs --reward_model"),
    case("stage1", "--overwrite --model_name {inputs}/not_a_model", r"has no config.json"),
    case("stage1", "--overwrite --levels 0,7", r"no level\(s\) \[7\]"),
    case("stage1", "--tag badconfig", r"run_config.json' is not readable JSON .*: pass --overwrite or another --tag"),
    case("stage1", "--tag badpart", r"rollouts_badpart/part-00000.parquet' is not a readable parquet file"),
    case("stage1", "--config {inputs}", r"'--config'.*is a directory"),
    case("stage1", "--rm_calibration_prompts 0", rf"'--rm_calibration_prompts': 0 {RANGE}"),
    case("stage1", "--group_sise 4", r"No such option '--group_sise'"),
    case("stage1", "--group_size", r"Option '--group_size' requires an argument"),
    case("stage1", "surplus", r"unexpected extra argument \(surplus\)"),
    case("stage1", "--config {inputs}/missing.yaml", r"cannot read '.*missing.yaml' as YAML .*fix the file"),
    case("stage1", "--config {inputs}/broken.yaml", r"cannot read '.*broken.yaml' as YAML .*fix the file"),
    case("stage1", "--config {inputs}/unknown_key.yaml", r"unknown key 'group_sise' in .*valid keys"),
    case("stage1", "--config {inputs}/a_list.yaml", r"must be a YAML mapping of option: value"),
    case("stage1", "--config {inputs}/bad_value.yaml",
         r"'--per_device_generation_batch_size': 'four' is not a valid integer"),
    case("stage1", "--config {inputs}/twice.yaml", r"sets group_size twice"),
]

STAGE2 = [
    case("stage2", "--rollouts {inputs}/nowhere", r"rollouts '.*nowhere' not found"),
    case("stage2", "--rollouts {inputs}/empty_dir", r"holds no .parquet files"),
    case("stage2", "--rollouts {inputs}/rollouts.jsonl", r"'.*rollouts.jsonl' is not a readable parquet file"),
    case("stage2", "--rollouts {inputs}/first_part_truncated.parquet",
         r"'.*first_part_truncated.parquet' is not a readable parquet file"),
    case("stage2", "--rollouts {inputs}/truncated_dump", r"'.*part-00001.parquet' is not a readable parquet file"),
    case("stage2", "--lr -1", rf"'--lr': -1.0 {RANGE} x>=0"),
    case("stage2", "--lr inf", r"'--lr': 'inf' is not a finite number"),
    case("stage2", "--backbone_lr -0.1", rf"'--backbone_lr': -0.1 {RANGE}"),
    case("stage2", "--per_device_train_batch_size 0", rf"'--per_device_train_batch_size': 0 {RANGE}"),
    case("stage2", "--max_epochs 0", rf"'--max_epochs': 0 {RANGE}"),
    case("stage2", "--lora_r 0", rf"'--lora_r': 0 {RANGE}"),
    case("stage2", "--lora_alpha 0", rf"'--lora_alpha': 0 {RANGE}"),
    case("stage2", "--last_k 0", rf"'--last_k': 0 {RANGE}"),
    case("stage2", "--head_hidden -1", rf"'--head_hidden': -1 {RANGE}"),
    case("stage2", "--val_fraction 0", rf"'--val_fraction': 0.0 {RANGE} 0<x<1"),
    case("stage2", "--val_fraction 1", rf"'--val_fraction': 1.0 {RANGE}"),
    case("stage2", "--precision fp16", r"'--precision': 'fp16' is not a Lightning precision"),
    case("stage2", "--precision transformer-engine", r"Lightning refuses .*--precision transformer-engine"),
    case("stage2", "--devices 0", r"'--devices': '0': give auto, a device count >= 1"),
    case("stage2", "--devices -2", r"'--devices': '-2': give auto"),
    case("stage2", "--devices two", r"'--devices': 'two': give auto"),
    case("stage2", "--devices 0,1", r"Lightning refuses .*--devices 0,1.*should be an int > 0", NEEDS_CPU_ONLY),
    case("stage2", "--accelerator foo", r"'--accelerator': 'foo' is not a Lightning accelerator"),
    case("stage2", "--accelerator cuda", r"Lightning refuses --accelerator cuda", NEEDS_CPU_ONLY),
    case("stage2", "--group_stats pooled", r"'--group_stats': 'pooled' is not one of"),
    case("stage2", "--backbone_mode full", r"'--backbone_mode': 'full' is not one of"),
    case("stage2", "--reward_key nope", r"--reward_key 'nope'"),
    case("stage2", "--backbone {other_model}", r"has a different tokenizer .*pass --backbone"),
    case("stage2", "--backbone /no/such/model", r"model '/no/such/model' not found"),
    case("stage2", "--backbone_mode last_k --last_k 5", r"--last_k must be in 1..2"),
    case("stage2", "--run_name done", r"run '.*done' exists: pass --resume to continue it or --run_name"),
    case("stage2", "--run_name seed0 --resume --seed 1", r"--resume: seed differ from the run in"),
    case("stage2", "--run_name badmeta --resume", r"metadata.json' is not readable JSON .*pass a new --run_name"),
    case("stage2", "--report_to foo", r"'--report_to': unknown --report_to foo: choose from"),
    case("stage2", "--report_to none,csv", r"--report_to none cannot be combined"),
    case("stage2", ["--run_name", ""], r"'--run_name': '' must name a run directory"),
    case("stage2", "--out_dir {inputs}/a_file", r"'--out_dir'.*is a file"),
    case("stage2", "--out_dir {inputs}/a_file/sub", r"pass a writable --out_dir"),
    case("stage2", "--seed -1", rf"'--seed': -1 {RANGE}"),
    case("stage2", "--report_examples -1", rf"'--report_examples': -1 {RANGE}"),
    case("stage2", "--config {inputs}/unknown_key.yaml", r"unknown key 'group_sise'"),
    case("stage2", "--rollouts", r"Option '--rollouts' requires an argument"),
]

STAGE3 = [
    case("stage3", "--temperature -1", rf"'--temperature': -1.0 {RANGE} x>0"),
    case("stage3", "--softmask delta --importance online --online_refit_every 0",
         r"--online_refit_every 0 never fits the online head: warm-start it with --importance_net"),
    case("stage3", "--online_refit_every -1", rf"'--online_refit_every': -1 {RANGE} x>=0"),
    case("stage3", "--online_features attention", r"'--online_features': 'attention' is not one of"),
    case("stage3", "--temperature 0", rf"'--temperature': 0.0 {RANGE} x>0"),
    case("stage3", "--top_p 2", rf"'--top_p': 2.0 {RANGE} 0<x<=1"),
    case("stage3", "--top_p 0", rf"'--top_p': 0.0 {RANGE}"),
    case("stage3", "--lr -1e-3", rf"'--lr': -0.001 {RANGE} x>=0"),
    case("stage3", "--learning_rate -1", rf"'--lr': -1.0 {RANGE}"),
    case("stage3", "--lr nan", r"'--lr': 'nan' is not a finite number"),
    case("stage3", "--run_name r --resume --lr 1e-3",
         r"--resume: --lr \(1e-06 in the checkpoint, 0.001 given\) differ .*only --max_steps.* may change"),
    case("stage3", "--run_name r --resume --sampler gaussian", r"--resume: --sampler \('balanced' in the checkpoint"),
    case("stage3", "--run_name r --resume --loss_type grpo --beta 0.1", r"--resume: --loss_type .*--beta .* differ"),
    case("stage3", "--run_name r --resume --rewards correct=1", r"--resume: --rewards .* differ"),
    case("stage3", "--run_name r --resume --lr_scheduler_type cosine", r"--resume: --lr_scheduler_type"),
    case("stage3", "--run_name r", r"already has checkpoints: pass --resume to continue it or --run_name"),
    case("stage3", "--run_name broken --resume", r"checkpoint '.*step-000001.ckpt' does not load"),
    case("stage3", "--group_size 1", rf"'--group_size': 1 {RANGE} x>=2"),
    case("stage3", "--num_generations 1", rf"'--group_size': 1 {RANGE}"),
    case("stage3", "--max_steps 0", rf"'--max_steps': 0 {RANGE}"),
    case("stage3", "--prompts_per_step 0", rf"'--prompts_per_step': 0 {RANGE}"),
    case("stage3", "--num_train_prompts 0", rf"'--num_train_prompts': 0 {RANGE}"),
    case("stage3", "--eval_prompts 0", rf"'--eval_prompts': 0 {RANGE}"),
    case("stage3", "--eval_every 0", rf"'--eval_every': 0 {RANGE}"),
    case("stage3", "--save_every 0", rf"'--save_every': 0 {RANGE}"),
    case("stage3", "--save_total_limit 0", rf"'--save_total_limit': 0 {RANGE}"),
    case("stage3", "--logging_steps 0", rf"'--logging_steps': 0 {RANGE}"),
    case("stage3", "--num_iterations 0", rf"'--num_iterations': 0 {RANGE}"),
    case("stage3", "--epsilon -0.1", rf"'--epsilon': -0.1 {RANGE}"),
    case("stage3", "--epsilon_high -1", rf"'--epsilon_high': -1.0 {RANGE}"),
    case("stage3", "--beta -1", rf"'--beta': -1.0 {RANGE}"),
    case("stage3", "--max_grad_norm 0", rf"'--max_grad_norm': 0.0 {RANGE} x>0"),
    case("stage3", "--weight_decay -0.01", rf"'--weight_decay': -0.01 {RANGE}"),
    case("stage3", "--warmup_steps -1", rf"'--warmup_steps': -1 {RANGE}"),
    case("stage3", "--warmup_ratio 1.5", rf"'--warmup_ratio': 1.5 {RANGE}"),
    case("stage3", "--warmup_steps 1 --warmup_ratio 0.1", r"give --warmup_steps or --warmup_ratio, not both"),
    case("stage3", "--lr_scheduler_type constant --warmup_steps 1", r"constant has no warm-up: use constant_with"),
    case("stage3", "--lr_scheduler_type step", r"'--lr_scheduler_type': 'step' is not one of"),
    case("stage3", "--warmup_steps 5", r"5 warm-up steps exceed --max_steps 1"),
    case("stage3", "--importance_sampling_level seq", r"'--importance_sampling_level': 'seq' is not one of"),
    case("stage3", "--softmask foo", r"'--softmask': 'foo' is not one of"),
    case("stage3", "--softmask delta", r"--softmask delta needs --importance_net"),
    case("stage3", "--softmask delta --importance_net /no/such/export", r"not an importance-net export"),
    case("stage3", "--importance_net /no/such/export", r"--importance_net is only used by --softmask delta or"),
    case("stage3", "--softmask_strength 1.5", rf"'--softmask_strength': 1.5 {RANGE}"),
    case("stage3", "--entropy_quantile 0", rf"'--entropy_quantile': 0.0 {RANGE}"),
    case("stage3", "--top_entropy_quantile 1.5", rf"'--entropy_quantile': 1.5 {RANGE}"),
    case("stage3", "--sampler nosuch", r"'--sampler': 'nosuch' is not one of"),
    case("stage3", ["--sampler", "gaussian", "--sampler_params", "{sigma: wide}"],
         r"--sampler gaussian: parameter sigma='wide' of sampler 'gaussian' must be a number"),
    case("stage3", ["--sampler", "gaussian", "--sampler_params", "{sgma: 1}"], r"unknown parameter\(s\) .*: sgma"),
    case("stage3", ["--sampler", "gaussian", "--sampler_params", "{sigma: -1}"], r"gaussian needs sigma > 0"),
    case("stage3", ["--sampler_params", "[1, 2]"], r"'--sampler_params': .* is not a YAML/JSON mapping"),
    case("stage3", ["--sampler_params", "{a: [1"], r"'--sampler_params': .* is not a YAML/JSON mapping"),
    case("stage3", "--sampler reward_curriculum", r"needs parameter\(s\) reward_threshold"),
    case("stage3", ["--levels", ""], r"'--levels': give at least one level"),
    case("stage3", "--levels 0,9", r"no level\(s\) \[9\]"),
    case("stage3", "--loss_type ppo", r"'--loss_type': 'ppo' is not one of"),
    case("stage3", "--scale_rewards std", r"'--scale_rewards': 'std' is not one of"),
    case("stage3", "--devices 0", r"'--devices': '0': give auto"),
    case("stage3", "--devices 0,1", r"Lightning refuses .*--devices 0,1", NEEDS_CPU_ONLY),
    case("stage3", "--strategy dpp", r"'--strategy': 'dpp' is not a Lightning strategy: choose from auto, ddp"),
    case("stage3", "--strategy fsdp", r"Lightning refuses .*--strategy fsdp.*only available on GPU", NEEDS_CPU_ONLY),
    case("stage3", "--use_peft --strategy fsdp", r"--use_peft with --strategy fsdp is not supported"),
    case("stage3", "--strategy deepspeed", r"Lightning refuses .*DeepSpeed", NO_DEEPSPEED),
    case("stage3", "--precision 17", r"'--precision': '17' is not a Lightning precision"),
    case("stage3", "--num_nodes 0", rf"'--num_nodes': 0 {RANGE}"),
    case("stage3", "--report_to foo", r"'--report_to': unknown --report_to foo: choose from"),
    case("stage3", "--report_to csv --report_to none", r"--report_to none cannot be combined"),
    case("stage3", "--rewards bogus=1", r"unknown reward\(s\) bogus"),
    case("stage3", "--rewards hybrid=1", r"--rewards hybrid needs --reward_model"),
    case("stage3", "--reward_model {model}", r"--reward_model is only used by the hybrid reward"),
    case("stage3", "--backend vllm", r"--backend vllm needs vLLM", NO_VLLM),
    case("stage3", "--task_name {inputs}/words_level.jsonl", r"column 'level' must hold integers"),
    case("stage3", "--model_name /no/such/model", r"model '/no/such/model' not found"),
    case("stage3", "--run_name runs/..", r"'--run_name': 'runs/..' must name a run directory"),
    case("stage3", "--out_dir {inputs}/a_file", r"pass a writable --out_dir"),
    case("stage3", "--per_device_generation_batch_size 0", rf"'--per_device_generation_batch_size': 0 {RANGE}"),
    case("stage3", "--seed -5", rf"'--seed': -5 {RANGE}"),
    case("stage3", "--max_completion_length 0", rf"'--max_new_tokens': 0 {RANGE}"),
    case("stage3", "--gpu_memory_utilization 0", rf"'--gpu_memory_utilization': 0.0 {RANGE}"),
    case("stage3", "--config {inputs}/bad_value.yaml",
         r"'--per_device_generation_batch_size': 'four' is not a valid integer"),
]


@pytest.mark.parametrize("stage, args, pattern", STAGE1 + STAGE2 + STAGE3)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, stage, args, pattern):
    invoke_and_check(world, stage, args, pattern)


def test_the_harness_sees_a_changed_tree(world):
    """The tree digest notices a new empty directory and a changed byte."""
    before = tree_digest(world["root"])
    (world["inputs"] / "new_dir").mkdir()
    assert tree_digest(world["root"]) != before
    (world["inputs"] / "new_dir").rmdir()
    assert tree_digest(world["root"]) == before


@pytest.mark.slow  # fresh interpreters: the imports take ~10-30 s each
@pytest.mark.parametrize("script, args, pattern", [
    ("generate_paired_rollouts.py", ["--rewards", "hybrid=1", "--overwrite"], r"--rewards hybrid needs"),
    ("train_importance_net.py", ["--rollouts", "{inputs}/rollouts.jsonl"], r"is not a readable parquet file"),
    ("train_grpo_softmask.py", ["--run_name", "r", "--resume", "--lr", "1e-3"], r"--resume: --lr"),
])
def test_real_process_prints_one_line(world, script, args, pattern):
    base = {"generate_paired_rollouts.py": _stage1_base(world["model"], world["out"]),
            "train_importance_net.py": [],
            "train_grpo_softmask.py": _stage3_base(world["model"], world["out"])}[script]
    before = tree_digest(world["root"])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, script, *base, *_expand(world, args)], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), out.stderr
    assert tree_digest(world["root"]) == before
