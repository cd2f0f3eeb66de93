"""``python -m benchmarks [--only stage1|stage2|stage3|memory] [--quick]`` (``make bench``): see docs/benchmarks.md.

Prints one table per stage and the issue targets (PASS/MISS), and writes everything as JSON to
``benchmarks/results/latest.json`` (git-ignored). Timings are never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STAGES = ("stage1", "stage2", "stage3", "memory")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=STAGES,
                        help="run only this stage (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="smaller settings (a few minutes): a smoke run")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (stages 1-2) / measured steps (stage 3) instead of the defaults")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (dump, exports, runs)")
    return parser.parse_args(argv)


def environment(threads: int) -> dict[str, Any]:
    import lightning
    import torch
    import transformers
    import trl

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "cuda": torch.cuda.is_available(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "lightning": lightning.__version__, "git_commit": commit}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model is local; nothing needs the network
    import torch

    from benchmarks import memory, stage1, stage2, stage3
    from benchmarks.common import Context, quiet_libraries
    from benchmarks.timing import checks_table, load_average, table

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    modules = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "memory": memory}
    selected = [s for s in STAGES if not args.only or s in args.only]
    ctx = Context(quick=args.quick)
    results: dict[str, Any] = {"environment": environment(torch.get_num_threads()), "quick": args.quick,
                               "load_average_start": load_average(), "stages": {}, "errors": {}}
    busy = results["load_average_start"]
    if busy is not None and busy > (os.cpu_count() or 1):
        print(f"note: load average {busy} on {os.cpu_count()} CPUs: other processes compete for the CPU, so absolute "
              "times are inflated (the interleaved ratios are what to read); with more torch threads than free "
              "cores, torch's thread barriers can slow it down several-fold: try --threads 1", flush=True)
    t0 = time.perf_counter()
    for name in selected:
        module = modules[name]
        cfg = module.QUICK if args.quick else module.Config()
        repeats = "steps" if name == "stage3" else "rounds"
        if args.rounds and hasattr(cfg, repeats):
            cfg = replace(cfg, **{repeats: args.rounds})
        print(f"\n=== {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
        start = time.perf_counter()
        try:
            summary = module.run(ctx, cfg)
        except Exception:  # noqa: BLE001 - report, go on with the next stage
            results["errors"][name] = traceback.format_exc()
            print(results["errors"][name], file=sys.stderr, flush=True)
            continue
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        results["stages"][name] = summary
        print(table(module.rows(summary), f"{name}: {summary['wall_s']} s"), flush=True)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["load_average_end"] = load_average()

    from benchmarks.timing import Check

    checks = [Check(**{k: v for k, v in c.items() if k != "result"})
              for s in results["stages"].values() for c in s["checks"]]
    results["checks"] = [c.to_dict() for c in checks]
    env = results["environment"]
    print(f"\n==== Benchmark summary ({env['date']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
          f"load average {results['load_average_start']} -> {results['load_average_end']}, "
          f"{results['wall_s']} s) ====")
    for name, summary in results["stages"].items():
        print("\n" + table(modules[name].rows(summary), name))
    print("\n" + checks_table(checks))
    for name in results["errors"]:
        print(f"  {name}: FAILED (traceback above and in the JSON)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    if args.keep:
        print(f"scratch kept in {ctx.workdir}")
    else:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
