"""One stage-3 step at the sizes users train, on one GPU: peak GPU memory and step time (docs/benchmarks.md).

    python -m benchmarks.gpu_check                       # a GPU node: ~3 min, needs torch, transformers, lightning
    python -m benchmarks.gpu_check --tiny --device cpu   # the same code path on a tiny model, on CPU

Random weights from a config (no download), bf16-mixed, G = 8 completions of 1,024 tokens (+64
prompt tokens), dapo, fused AdamW, generation excluded; every row in a fresh process
(``benchmarks.memory``'s probe), so an out-of-memory row does not disturb the next:

- Qwen2.5-1.5B shape, full fine-tune, before (one batch, all logits at once, no checkpointing);
- the same after: micro-batches of 2, log-probs in chunks of 512 positions, gradient checkpointing;
- Qwen2.5-7B shape with LoRA (r 16 on q_proj, v_proj; peft needed, else the row is skipped), after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.memory import BEFORE, GB, QWEN_7B, QWEN_15B, TINY, Probe, measure

AFTER = {"micro_batch": 2, "chunk": 512, "checkpointing": True}


def plan(tiny: bool, device: str) -> list[tuple[str, Probe]]:
    big, lora_shape = (TINY, TINY) if tiny else (QWEN_15B, QWEN_7B)
    step = Probe(shape=big.name, G=8, T=64 if tiny else 1024, P=16 if tiny else 64, precision="bf16-mixed",
                 device=device)
    after = replace(step, **{**AFTER, "chunk": 32 if tiny else AFTER["chunk"]})
    return [(f"{big.name} full, before", replace(step, **BEFORE)),
            (f"{big.name} full, after", after),
            (f"{lora_shape.name} LoRA, after", replace(after, shape=lora_shape.name, lora=True))]


def run_row(name: str, probe: Probe) -> dict[str, Any]:
    if probe.lora and importlib.util.find_spec("peft") is None:
        return {"name": name, "error": "skipped: peft is not installed"}
    try:
        result = measure(probe)
    except RuntimeError as err:
        out_of_memory = "OutOfMemoryError" in str(err) or "out of memory" in str(err)
        return {"name": name, "error": "out of memory" if out_of_memory else str(err).splitlines()[-1]}
    return {"name": name, **result}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'run':<34} {'params':>8} {'trained':>9} {'peak GB':>8} {'held GB':>8} {'step s':>7}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<34} {row['error']}")
            continue
        lines.append(f"{row['name']:<34} {_count(row['params']):>8} {_count(row['trainable']):>9} "
                     f"{row['peak_bytes'] / GB:>8.2f} {row['held_bytes'] / GB:>8.2f} {row['step_s']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the code path in seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device: run on a GPU node, or pass --device cpu --tiny", file=sys.stderr)
        raise SystemExit(2)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"one stage-3 step, bf16-mixed, G=8 completions, on {where} (torch {torch.__version__})", flush=True)
    rows = []
    for name, probe in plan(args.tiny, args.device):
        rows.append(run_row(name, probe))
        print(f"  {name}: done", flush=True)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
