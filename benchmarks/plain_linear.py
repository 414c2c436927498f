"""The matmul behind Relay's plain CPU weight layout against vLLM's packed one and against `F.linear`.

A diagnostic, not one of the suite's ratios (`python -m benchmarks.plain_linear [--quick]`, ~10 s): one thread, as
in a rollout actor; for each weight shape and batch (tokens in a forward), the median time of

- `packed`: vLLM's CPU dispatch, a oneDNN handle over a copy of the weight reordered once (the baseline; also
  what a plain layer runs once a version has served `PACK_AFTER_CALLS` calls);
- `pack`: making that handle, what a plain layer pays once a version (`pack_calls`: the `packed` calls it
  takes to repay the pack, what `transport.plain_weights.PACK_AFTER_CALLS` is set from);
- `plain`: oneDNN on the live weight, reordering per call (a version's first calls, and compiled engines);
- `f_linear`: `torch.nn.functional.linear`, vLLM's own fallback and Relay's plain matmul before.

Ratios are time over `packed`'s (1.0 = as fast as vLLM's layout). Shapes: the default job's tiny model at decode
(16 prompts x n=8) and a Qwen2.5-0.5B-sized layer and LM head.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from transport.plain_weights import plain_matmul

SHAPES = {  # name: (tokens, out_features, in_features)
    "tiny_qkv_decode": (128, 384, 128),
    "tiny_gate_up_decode": (128, 512, 128),
    "tiny_down_decode": (128, 128, 256),
    "tiny_lm_head_decode": (128, 64, 128),
    "0.5b_mlp_decode_8": (8, 4864, 896),
    "0.5b_mlp_prefill_512": (512, 4864, 896),
    "0.5b_lm_head_decode_8": (8, 151936, 896),
}


def _median_s(fn, repeats: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool) -> dict:
    """One thread, as in a rollout actor; the caller's thread count is restored (tests call this in-process, and once
    a vLLM engine has run in a process, vLLM makes `torch.set_num_threads` a no-op there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict:
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    rows = {}
    for name, (m, n, k) in SHAPES.items():
        if quick and not name.startswith("tiny"):
            continue
        x, w = torch.randn(m, k), torch.randn(n, k)
        repeats = 10 if quick else (50 if n * k < 10**6 else 15)
        with torch.inference_mode():
            handle = ops.create_onednn_mm(w.t(), 32)  # vLLM's packed dispatch for this weight
            plain = plain_matmul(w.dtype)
            err = (plain(x, w, None) - torch.nn.functional.linear(x, w)).abs().max().item()
            t = {"pack": _median_s(lambda: ops.create_onednn_mm(w.t(), 32), max(3, repeats // 5)),
                 "packed": _median_s(lambda: ops.onednn_mm(handle, x, None), repeats),
                 "plain": _median_s(lambda: plain(x, w, None), repeats),
                 "f_linear": _median_s(lambda: torch.nn.functional.linear(x, w), repeats)}
        rows[name] = {"shape": [m, n, k], "us": {a: round(v * 1e6, 1) for a, v in t.items()},
                      "plain_over_packed": round(t["plain"] / t["packed"], 3),
                      "f_linear_over_packed": round(t["f_linear"] / t["packed"], 3),
                      "pack_calls": round(t["pack"] / max(t["plain"] - t["packed"], 1e-9), 1),
                      "max_abs_diff_vs_f_linear": err}
    return {"name": "plain_linear", "dtype": "float32", "threads": 1, "plain_matmul": plain.__name__, "shapes": rows}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick)))
