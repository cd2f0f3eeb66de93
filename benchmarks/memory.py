"""Stage 3 at scale: peak memory of one GRPO step (generation excluded), before and after the memory savings.

A random model with Qwen2.5-0.5B's shape (vocabulary 151,936; built from a config, no download)
takes one stage-3 step of G completions of T tokens on CPU, each measurement in a fresh subprocess.
The step is the pipeline's own: ``microbatch.accumulate`` (log-probs, entropy, dapo loss, backward),
gradient clipping, fused AdamW. A warm-up step on one short completion runs first, so AdamW's states
exist during the measured step, as in every step after the first. Memory: what is held before the
step, then the peak above it during forward/backward and during the optimizer step (the kernel's
resident high-water mark, reset between phases; ``torch.cuda`` statistics on a GPU).

- ``empty``: a step on one 16-token completion: weights, gradients, AdamW states;
- ``before_1``, ``before_2``: one batch, all logits at once, no checkpointing (the code before issue
  14), with 1 and 2 completions; G = 8 x 1,024 would need ~50 GB, so it is extrapolated linearly
  in the completions (a batch's forward/backward memory is linear in its rows);
- ``after_1``: one completion with the savings, for the memory a checkpointed forward keeps;
- ``after``: micro-batches of 2, log-probs in chunks, gradient checkpointing, measured at G = 8;
- the LM head alone (all at once, and in chunks): bytes per logit element.

From the measured per-parameter and per-element costs it predicts the peak of the same step on a
GPU under bf16-mixed for Qwen2.5-1.5B (full fine-tune) and Qwen2.5-7B (LoRA); ``benchmarks/gpu_check.py``
measures those on a GPU. One probe alone: ``python -m benchmarks.memory --probe '{"shape": "tiny", "G": 2, "T": 32}'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

TARGET_RATIO = 0.25
TARGET_GB = 80.0
GB = 1e9


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool


QWEN_05B = Shape("Qwen2.5-0.5B", 151_936, 896, 4_864, 24, 14, 2, True)
QWEN_15B = Shape("Qwen2.5-1.5B", 151_936, 1_536, 8_960, 28, 12, 2, True)
QWEN_7B = Shape("Qwen2.5-7B", 152_064, 3_584, 18_944, 28, 28, 4, False)
SMALL = Shape("small (Qwen vocabulary, 4 layers)", 151_936, 256, 704, 4, 4, 2, True)
TINY = Shape("tiny", 512, 64, 128, 2, 4, 2, True)
SHAPES = {s.name: s for s in (QWEN_05B, QWEN_15B, QWEN_7B, SMALL, TINY)}


@dataclass(frozen=True)
class Probe:
    """One measured step: the model, the batch and the memory options."""

    shape: str = QWEN_05B.name
    G: int = 8  # completions in the step
    T: int = 1024  # completion tokens
    P: int = 64  # prompt tokens
    micro_batch: int | None = None  # None: one batch
    chunk: int = 0  # log-prob chunk (0: all positions at once)
    checkpointing: bool = False
    lora: bool = False
    precision: str = "32-true"
    device: str = "cpu"
    empty: bool = False  # measure a step of one 16-token completion: weights, gradients, AdamW


BEFORE = {"micro_batch": None, "chunk": 0, "checkpointing": False}


def qwen_config(shape: Shape) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                       max_position_embeddings=4096, use_sliding_window=False)


def grpo_args(probe: Probe) -> Any:
    from pipeline.grpo.config import GRPOArgs

    return GRPOArgs(model_name=f"random {probe.shape}", gradient_checkpointing=probe.checkpointing,
                    use_peft=probe.lora, lora_dropout=0.0, precision=probe.precision,
                    per_device_train_batch_size=probe.micro_batch, logprob_chunk_size=probe.chunk)


def random_policy(probe: Probe) -> Any:
    """The shape's model with random weights, prepared as stage 3 prepares a policy."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.grpo.policy import base_dtype, prepare_policy

    args = grpo_args(probe)
    with torch.device(probe.device):
        model = AutoModelForCausalLM.from_config(qwen_config(SHAPES[probe.shape]), dtype=base_dtype(args))
    return prepare_policy(model, args)


def random_batch(probe: Probe, completions: int, length: int, device: Any) -> Any:
    """Left-padded random prompts of ``P`` tokens and full-length completions (every token counts)."""
    import torch

    from pipeline.grpo.microbatch import PolicyBatch

    gen = torch.Generator().manual_seed(completions * 10_000 + length)
    vocab = SHAPES[probe.shape].vocab
    ids = torch.randint(0, vocab, (completions, probe.P + length), generator=gen)
    return PolicyBatch(ids.to(device), torch.ones_like(ids).to(device), torch.ones(completions, length, device=device),
                       torch.randn(completions, generator=gen).to(device))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


class PeakMemory:
    """Peak memory of a phase: the kernel's resident high-water mark (reset through clear_refs), or CUDA's."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def current(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else _status_kb("VmRSS") * 1024

    def reset(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        return self.current()

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kb("VmHWM") * 1024


def run_probe(probe: Probe) -> dict[str, Any]:
    """Build the policy and take a warm-up step (so AdamW's states exist, as in every later step); then
    measure the memory held before the next step, the activations a forward saves for backward, and
    the peaks above the held memory during forward/backward and during the optimizer step."""
    import lightning as L
    import torch  # noqa: F401 - imported before the baseline, like everything the step uses
    import transformers  # noqa: F401

    from pipeline.grpo.logprobs import completion_logprobs
    from pipeline.grpo.microbatch import accumulate
    from pipeline.grpo.policy import build_optimizer, setup

    if probe.lora:
        import peft  # noqa: F401
    cuda = probe.device.startswith("cuda")
    memory = PeakMemory(cuda)
    base = memory.current()
    fabric = L.Fabric(accelerator="cuda" if cuda else "cpu", devices=1, precision=probe.precision)
    args = grpo_args(probe)
    policy = random_policy(probe)
    model, optimizer = setup(fabric, policy, build_optimizer(policy, args))

    def backward(batch) -> None:
        options = {"num_items_in_batch": batch.completion_mask.sum()}
        accumulate(fabric, model, batch, "dapo", options, probe.micro_batch, 1.0, with_entropy=True,
                   chunk_size=probe.chunk)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    backward(random_batch(probe, 1, 16, fabric.device))
    optimizer_step()
    batch = random_batch(probe, 1, 16, fabric.device) if probe.empty else random_batch(probe, probe.G, probe.T,
                                                                                        fabric.device)
    held = memory.reset()
    part = batch.rows(slice(0, probe.micro_batch or len(batch)))
    logps, _ = completion_logprobs(model, part.input_ids, part.attention_mask, part.completion_len,
                                   chunk_size=probe.chunk)
    saved = memory.current() - held  # what one micro-batch's forward keeps for its backward
    del logps
    memory.reset()
    start = time.perf_counter()
    backward(batch)
    backward_peak = memory.peak()
    memory.reset()
    optimizer_step()
    optimizer_peak = memory.peak()
    seconds = time.perf_counter() - start
    trainable = [p for p in policy.parameters() if p.requires_grad]
    return {"probe": asdict(probe), "params": sum(p.numel() for p in policy.parameters()),
            "trainable": sum(p.numel() for p in trainable), "held_bytes": held - base, "saved_bytes": saved,
            "backward_bytes": backward_peak - held, "optimizer_bytes": optimizer_peak - held,
            "peak_bytes": max(backward_peak, optimizer_peak) - base, "step_s": seconds,
            "memory": "torch.cuda.max_memory_allocated" if cuda else "resident memory (VmHWM, VmRSS)"}


def run_head_probe(shape: Shape, rows: int, chunk: int) -> dict[str, Any]:
    """Forward and backward of the LM head alone over ``rows`` positions: peak bytes per logit element,
    less the head's weight gradient (and, in chunks, the buffer each chunk's gradient is summed from)."""
    import torch

    from pipeline.grpo.logprobs import ChunkedHead

    memory = PeakMemory(cuda=False)
    head = torch.nn.Linear(shape.hidden, shape.vocab, bias=False)
    hidden = torch.randn(1, rows + 1, shape.hidden, requires_grad=True)
    targets = torch.randint(0, shape.vocab, (1, rows))
    held = memory.reset()
    ChunkedHead(head.forward, targets, 1.0, chunk, with_entropy=True)(hidden).sum().backward()
    gradient = head.weight.numel() * 4 * (2 if 0 < chunk < rows else 1)  # chunks add into an accumulation buffer
    transient = memory.peak() - held - gradient
    return {"rows": rows, "chunk": chunk, "bytes_per_logit": transient / (min(chunk or rows, rows) * shape.vocab)}


def measure(probe: Probe | dict[str, Any]) -> dict[str, Any]:
    """A probe (or a head probe, given as a dict) in a fresh process, so its peak is its own; large
    allocations are mmap'd, so freed memory leaves the resident set."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TOKENIZERS_PARALLELISM": "false"}
    spec = ["--head", json.dumps(probe)] if isinstance(probe, dict) else ["--probe", json.dumps(asdict(probe))]
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", *spec], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


@dataclass
class Config:
    shape: str = QWEN_05B.name
    G: int = 8
    T: int = 1024
    P: int = 64
    micro_batch: int = 2
    chunk: int = 512
    predict_T: int = 1024  # the GPU predictions' completions (G does not matter after micro-batching)
    lora_r: int = 16  # peft's default targets for Qwen2: q_proj, v_proj


QUICK = Config(shape=SMALL.name, G=4, T=256, P=32, chunk=64)
PROBES = ("empty", "before_1", "before_2", "after_1", "after")


def _probes(cfg: Config) -> dict[str, Probe]:
    common = Probe(shape=cfg.shape, G=cfg.G, T=cfg.T, P=cfg.P)
    after = replace(common, micro_batch=cfg.micro_batch, chunk=cfg.chunk, checkpointing=True)
    return {"empty": replace(common, empty=True, G=1), "before_1": replace(common, G=1, **BEFORE),
            "before_2": replace(common, G=2, **BEFORE), "after_1": replace(after, G=1, micro_batch=1), "after": after}


def lora_params(shape: Shape, r: int) -> int:
    """LoRA on q_proj and v_proj (peft's default for Qwen2), r x (in + out) per matrix."""
    head_dim = shape.hidden // shape.heads
    return shape.layers * r * ((shape.hidden + shape.hidden) + (shape.hidden + shape.kv_heads * head_dim))


def shape_params(shape: Shape) -> int:
    """Parameters of a Qwen2 decoder (q/k/v biases, RMSNorms, embedding tied or not)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    attention = shape.hidden * (shape.hidden + 2 * kv) + shape.hidden + 2 * kv + shape.hidden * shape.hidden
    layer = attention + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    return shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.layers * layer + shape.hidden


def predict(costs: dict[str, float], shape: Shape, cfg: Config, lora: bool) -> dict[str, float]:
    """Peak of one step under bf16-mixed on a GPU from the measured costs: a sum of parts, an upper bound.

    Held through the step: the trained weights with their AdamW states (measured bytes per
    parameter), and for LoRA the frozen base in bf16 (2 bytes). During forward/backward, on top:
    the gradients (4 bytes per trained parameter), autocast's bf16 copies of fp32 weights (2 bytes
    per parameter, full fine-tune), the vocabulary matrices' gradient temporaries (full fine-tune),
    the checkpointed activations of one micro-batch, one layer's full activations (recomputed), one
    logits chunk. The CPU measurements are fp32, where bf16-mixed keeps some activations in bf16.
    """
    params = shape_params(shape)
    trained = lora_params(shape, cfg.lora_r) if lora else params
    tokens = cfg.micro_batch * (cfg.P + cfg.predict_T)
    held = trained * costs["held_per_param"] + (params * 2 if lora else 0)
    vocabulary = shape.vocab * shape.hidden * 4 * (1 if shape.tied else 2)
    parts = {
        "gradients": trained * 4 + (0 if lora else 2 * params + 2 * vocabulary),
        "checkpointed": costs["checkpointed_per_element"] * tokens * shape.layers * shape.hidden,
        "one layer": costs["layer_per_element"] * tokens * shape.hidden,
        "logits chunk": costs["chunk_per_logit"] * cfg.chunk * shape.vocab,
    }
    backward = sum(parts.values())
    return {"params": params, "held_gb": held / GB, **{f"{k}_gb": v / GB for k, v in parts.items()},
            "peak_gb": (held + backward) / GB}


def run(ctx: Any, cfg: Config) -> dict[str, Any]:
    probes = _probes(cfg)
    shape = SHAPES[cfg.shape]
    r: dict[str, Any] = {}
    for name in PROBES:
        probe = probes[name]
        print(f"  probe {name}: G={probe.G} T={probe.T} micro-batch={probe.micro_batch} chunk={probe.chunk} "
              f"checkpointing={probe.checkpointing} (available memory {available_bytes() / GB:.1f} GB)", flush=True)
        r[name] = measure(probe)
        print(f"    held {r[name]['held_bytes'] / GB:.2f} GB + forward/backward {r[name]['backward_bytes'] / GB:.2f} GB"
              f" / optimizer {r[name]['optimizer_bytes'] / GB:.2f} GB; step {r[name]['step_s']:.1f} s", flush=True)
    heads = {name: measure({"shape": cfg.shape, "rows": cfg.T, "chunk": chunk})
             for name, chunk in (("before", 0), ("chunk", cfg.chunk))}
    params = r["empty"]["params"]
    held = r["after"]["held_bytes"]

    def backward(name: str) -> int:
        return r[name]["backward_bytes"]

    per_completion = backward("before_2") - backward("before_1")  # the before step is linear in the batch
    before = held + max(backward("before_1") + (cfg.G - 1) * per_completion, r["after"]["optimizer_bytes"])
    after = r["after"]["peak_bytes"]
    tokens = cfg.P + cfg.T  # per completion
    logits_saved = cfg.T * shape.vocab * 4  # the before forward keeps its fp32 logits for backward
    costs = {"held_per_param": held / params,
             "before_per_completion_gb": per_completion / GB,
             "before_per_logit": per_completion / (cfg.T * shape.vocab),
             "head_before_per_logit": heads["before"]["bytes_per_logit"],
             "chunk_per_logit": heads["chunk"]["bytes_per_logit"],
             "checkpointed_per_element": r["after_1"]["saved_bytes"] / (tokens * shape.layers * shape.hidden),
             "layer_per_element": max(r["before_1"]["saved_bytes"] - logits_saved, 0) / (tokens * shape.layers
                                                                                         * shape.hidden)}
    predictions = {"1.5B full": predict(costs, QWEN_15B, cfg, lora=False),
                   "7B LoRA": predict(costs, QWEN_7B, cfg, lora=True)}
    summary = {"config": asdict(cfg), "probes": r, "heads": heads, "costs": costs, "before_bytes": before,
               "after_bytes": after, "ratio": after / before, "predictions": predictions}
    setting = f"{shape.name}, G={cfg.G} x {cfg.T} tokens, CPU resident memory" + (" (quick: not the issue's model)"
                                                                                  if shape != QWEN_05B else "")
    summary["checks"] = [
        {"name": "memory after / before (one step)", "value": summary["ratio"], "target": TARGET_RATIO, "op": "<=",
         "detail": setting},
        *({"name": f"predicted peak GB, {name}, bf16-mixed", "value": p["peak_gb"], "target": TARGET_GB,
           "op": "<=", "detail": f"x {cfg.predict_T} tokens, micro-batch {cfg.micro_batch}, chunk {cfg.chunk}"}
          for name, p in predictions.items()),
    ]
    return summary


def rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    c, p, k = s["config"], s["probes"], s["costs"]

    def split(name: str) -> str:
        return (f"{p[name]['peak_bytes'] / GB:.2f} (held {p[name]['held_bytes'] / GB:.2f} + max(forward/backward "
                f"{p[name]['backward_bytes'] / GB:.2f}, optimizer {p[name]['optimizer_bytes'] / GB:.2f}))")

    out = [("model", f"{c['shape']} random weights, {p['empty']['params'] / 1e6:.0f}M parameters, fp32, CPU"),
           ("step", f"G={c['G']} completions x {c['T']} tokens (+{c['P']} prompt), dapo, fused AdamW, "
                    "generation excluded"),
           ("empty step (one 16-token completion) GB", split("empty")),
           ("before, 1 / 2 completions measured GB", f"{split('before_1')} / {split('before_2')}"),
           (f"before, G={c['G']} (linear in the completions) GB", s["before_bytes"] / GB),
           (f"after, G={c['G']} measured GB (micro-batch {c['micro_batch']}, chunk {c['chunk']}, checkpointing)",
            split("after")),
           ("after / before", s["ratio"]),
           (f"step s: before 2 completions / after G={c['G']}", f"{p['before_2']['step_s']:.1f} / "
                                                                f"{p['after']['step_s']:.1f}"),
           ("bytes held per parameter (fp32 weight + AdamW states)", k["held_per_param"]),
           ("before: GB per completion / bytes per logit element (with its activations)",
            f"{k['before_per_completion_gb']:.2f} / {k['before_per_logit']:.1f}"),
           ("LM head alone, bytes per logit element: all at once / per chunk",
            f"{k['head_before_per_logit']:.1f} / {k['chunk_per_logit']:.1f}"),
           ("bytes per activation element (token x layer x hidden): checkpointed / all kept",
            f"{k['checkpointed_per_element']:.1f} / {k['layer_per_element']:.1f}")]
    for name, pred in s["predictions"].items():
        parts = ", ".join(f"{part} {pred[f'{part}_gb']:.1f}" for part in ("gradients", "checkpointed", "one layer",
                                                                           "logits chunk"))
        out.append((f"predicted GPU peak, {name} ({pred['params'] / 1e9:.2f}B), bf16-mixed GB",
                    f"{pred['peak_gb']:.1f} (held {pred['held_gb']:.1f} + {parts})"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one memory probe (used by the memory benchmark)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--probe", help="JSON of a Probe: one stage-3 step")
    group.add_argument("--head", help='JSON {"shape": ..., "rows": ..., "chunk": ...}: the LM head alone')
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(Probe(**json.loads(args.probe)))))
    else:
        head = json.loads(args.head)
        print(json.dumps(run_head_probe(SHAPES[head["shape"]], head["rows"], head["chunk"])))


if __name__ == "__main__":
    main()
