"""`python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR]`: every Relay speed ratio, in one run.

Each ratio compares Relay with its baseline inside this one process run, on this
machine, interleaved and repeated (median and spread reported), because the
machines are shared and noisy. Writes `<out>/<timestamp>.json` and `.md` plus
`latest.json` / `latest.md`. `--quick` shrinks sizes and repeats but runs the
same code paths under the same names. A benchmark that fails is recorded with
null values and the error, and the run exits non-zero after writing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import REQUIRED_NAMES, machine_info, ray_start, result, skipped, write_results

# Module per measurement, in run order, with the result names each returns.
SUITE = (
    ("benchmarks.buffer_bench", ("buffer_vs_ray_queue",)),
    ("benchmarks.rollout", ("rollout_vs_bare_vllm", "rollout_vs_bare_vllm_long")),
    ("benchmarks.scaling", ("rollout_scaling",)),
    ("benchmarks.weight_sync", ("weight_sync_vs_memcpy", "learner_blocked_fraction")),
    ("benchmarks.learner", ("learner_vs_bare_torch",)),
    ("benchmarks.learner_memory", ("learner_memory_vs_full_logits", "learner_speed_vs_full_logits")),
    ("benchmarks.lora_sync", ("lora_sync_bytes_vs_full", "lora_sync_time_vs_full", "lora_learner_memory_vs_full")),
    ("benchmarks.async_sync", ("async_vs_sync", "sync_overhead")),
    ("benchmarks.trl_e2e", ("e2e_vs_trl_grpo", "e2e_vs_trl_grpo_bf16")),
    ("benchmarks.reward_offload", ("reward_offload",)),
)
UNITS = {"buffer_vs_ray_queue": ("groups/s", 5.0), "rollout_vs_bare_vllm": ("tokens/s", 0.9),
         "rollout_vs_bare_vllm_long": ("tokens/s", None),
         "rollout_scaling": ("tokens/s", None), "weight_sync_vs_memcpy": ("bytes/s", 0.5),
         "learner_blocked_fraction": ("s", 0.1), "learner_vs_bare_torch": ("tokens/s", 0.85),
         "learner_memory_vs_full_logits": ("GiB peak", 0.25), "learner_speed_vs_full_logits": ("tokens/s", 0.9),
         "lora_sync_bytes_vs_full": ("bytes/sync", 0.1), "lora_sync_time_vs_full": ("s/sync", 0.5),
         "lora_learner_memory_vs_full": ("GiB peak", 0.6),
         "async_vs_sync": ("learner steps/min", 1.3), "sync_overhead": ("s/step", 1.25), "e2e_vs_trl_grpo": ("samples/s", 2.0),
         "e2e_vs_trl_grpo_bf16": ("samples/s", None),
         "reward_offload": ("samples/s", 1.0)}


def run_suite(quick: bool, only: set[str] | None) -> tuple[list[dict], bool]:
    """Results in REQUIRED_NAMES order, and whether every selected benchmark ran."""
    import importlib

    import ray

    ray_start()
    by_name, ok = {}, True
    try:
        for module, names in SUITE:
            if only and not only & set(names):
                continue
            t0 = time.perf_counter()
            print(f"benchmarks: {module} ...", file=sys.stderr, flush=True)
            try:
                out = importlib.import_module(module).run(quick)
                for r in out if isinstance(out, list) else [out]:
                    if "met" not in r:  # buffer_bench predates common.result: recompute the row through it
                        r = result(**{k: v for k, v in r.items() if k != "ratio"})
                    by_name[r["name"]] = r | {"seconds": round(time.perf_counter() - t0, 1)}
            except Exception as exc:  # one broken benchmark must not hide the others' numbers
                ok = False
                traceback.print_exc()
                for name in names:
                    by_name[name] = skipped(name, *UNITS[name], note=f"failed: {type(exc).__name__}: {exc}"[:500])
            print(f"benchmarks: {module} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return [by_name[n] for n in REQUIRED_NAMES if n in by_name], ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (the smoke test uses it)")
    parser.add_argument("--only", nargs="+", choices=REQUIRED_NAMES, help="run only the benchmarks producing these names")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine = machine_info()
    t0 = time.perf_counter()
    results, ok = run_suite(args.quick, set(args.only) if args.only else None)
    machine["loadavg_end"] = os.getloadavg()
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (f" --only {' '.join(args.only)}" if args.only else "")
    doc = {"machine": machine, "command": command, "quick": args.quick, "wall_s": round(time.perf_counter() - t0, 1),
           "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    path = write_results(doc, Path(args.out))
    print((path.with_suffix(".md")).read_text())
    print(f"benchmarks: wrote {path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
