"""LoRA: what adapter-only sync saves per weight sync, and what LoRA saves in a learner step's peak memory.

Weight sync, on one model and one transport (object_store, the default): a DeepSpeed learner rank publishes a
version and a rollout actor applies it, timed from the publish call to the generator serving it (as
benchmarks.weight_sync does), for three learners of the same model:
- full fine-tuning, full weights (the baseline);
- LoRA with `learner.lora.sync: adapter`: only the adapter's tensors travel and vLLM serves them on the base model
  (the generator checks them whole, writes a PEFT directory and `add_lora`s it);
- LoRA with `sync: merged` (what every transport can carry): full weights with the adapter merged in, for reference.
Reported: bytes per sync and seconds per sync, adapter against full weights.

Learner memory: two training steps (the first allocates the optimizer state) of full fine-tuning and of LoRA on the
same model and batch, each in a fresh subprocess; the peak is the process's resident high-water mark over the steps
(reset once the learner is built, so model loading's transient copies do not count; where /proc/self/clear_refs
cannot reset it, the whole process's ru_maxrss).

    .venv/bin/python -m benchmarks.lora_sync [--quick]
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.common import rss_gib

RANK = 16  # learner.lora.rank, on all seven projections (the default target_modules)
MODES = ("full", "lora_adapter", "lora_merged")


def _learner_config(mode: str, max_len: int):
    from learner.config import LearnerConfig
    from learner.objectives import ObjectiveConfig

    lora = None if mode == "full" else {"rank": RANK, "alpha": 2.0 * RANK, "sync": mode.removeprefix("lora_")}
    return LearnerConfig(groups_per_step=1, micro_batch_groups=1, objective=ObjectiveConfig(max_len=max_len),
                         lora=lora)


def measure_sync(mode: str, model_path: str, repeats: int) -> list[dict]:
    """`repeats` timed syncs of `mode` (after 3 untimed ones: first loads allocate)."""
    import ray

    from actors.actor import make_rollout_actor
    from actors.config import ActorConfig
    from benchmarks.rollout import MAX_MODEL_LEN
    from benchmarks.weight_sync import PublishingRank, free_port, sync_once
    from transport.registry import make_transport

    transport = make_transport("object_store", "")
    rank = ray.remote(PublishingRank).options(
        num_cpus=1, max_concurrency=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    ).remote(_learner_config(mode, 8), model_path, 8, 1.0, 0, 1, "127.0.0.1", free_port(), transport)
    actor = make_rollout_actor(ActorConfig(), 0, model_path=model_path, max_model_len=MAX_MODEL_LEN,
                               transport=transport, fetch_timeout_s=120,
                               adapter_rank=RANK if mode == "lora_adapter" else None)
    try:
        ray.get([rank.node_ip.remote(), actor.version.remote()])
        for _ in range(3):
            ray.get(actor.sync.remote(ray.get(rank.timed_publish.remote())[0]))
        samples = []
        for _ in range(repeats):
            handle, publish_s, load_s, total, _ = sync_once(rank, actor)
            assert (handle.adapter is not None) == (mode == "lora_adapter"), mode
            samples.append({"mode": mode, "bytes": handle.nbytes, "publish_s": round(publish_s, 4),
                            "fetch_load_s": round(load_s, 4), "total_s": round(total, 4)})
    finally:
        ray.kill(rank)
        ray.kill(actor)
        transport.close()
    return samples


def _in_vocabulary(batch, model_path: str):
    """`batch` with its token ids (0, 1, 2, ... per row) folded into the model's vocabulary."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    ids = batch.column("token_ids")
    folded = pa.ListArray.from_arrays(ids.offsets, pa.array(np.asarray(ids.values) % vocab, pa.int32()))
    return batch.set_column(batch.schema.get_field_index("token_ids"), "token_ids", folded)


def child(mode: str, model_path: str, response_len: int) -> dict:
    """One learner in this process: warm-up step, timed step, the process's peak resident memory."""
    import os
    import socket

    from buffer.testing import fake_group_fast
    from learner.learner import Learner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    learner = Learner(_learner_config(mode, response_len), model_path, group_size=8, temperature=1.0)
    batch = _in_vocabulary(fake_group_fast("g", 8, response_len=response_len, prompt_len=16), model_path)
    before = rss_gib("VmRSS")
    reset = _reset_peak()  # from here the high-water mark is the steps', not model loading's transient copies
    learner.train_step(batch)
    t0 = time.perf_counter()
    learner.train_step(batch)
    trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
    return {"mode": mode, "step_s": round(time.perf_counter() - t0, 3), "trainable_params": trainable,
            "peak_gib": rss_gib("VmHWM") if reset else round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            "peak_is": "steps" if reset else "process", "rss_before_steps_gib": before}


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0: `5` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(model_path: str, response_len: int, repeats: int) -> list[dict]:
    """Both learners, each in a fresh subprocess, `repeats` times in alternating order."""
    samples = []
    for k in range(repeats):
        for mode in ("full", "lora_adapter") if k % 2 == 0 else ("lora_adapter", "full"):
            cmd = [sys.executable, "-m", "benchmarks.lora_sync", "--child", mode, "--model", model_path,
                   "--response-len", str(response_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"lora_sync memory child {mode} failed: {proc.stderr[-2000:]}")
            samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return samples


def run(quick: bool) -> list[dict]:
    """Three results: bytes and seconds per sync (adapter vs full weights), learner step peak (LoRA vs full)."""
    from benchmarks.common import build_bench_model, result, spread

    hidden, layers, repeats, response_len = (128, 2, 2, 16) if quick else (768, 11, 5, 48)
    model_path, params = build_bench_model(hidden, layers)
    syncs = {mode: measure_sync(mode, model_path, repeats) for mode in MODES}
    memory = measure_memory(model_path, response_len, 1 if quick else 2)
    med = lambda mode, key: statistics.median(s[key] for s in syncs[mode])  # noqa: E731
    peak = lambda mode: statistics.median(s["peak_gib"] for s in memory if s["mode"] == mode)  # noqa: E731
    config = {"params": params, "hidden": hidden, "layers": layers, "lora_rank": RANK, "transport": "object_store",
              "merged_sync": {"bytes": med("lora_merged", "bytes"), "total_s": med("lora_merged", "total_s")},
              "response_len": response_len}
    adapter_s, full_s = [s["total_s"] for s in syncs["lora_adapter"]], [s["total_s"] for s in syncs["full"]]
    sync_samples = syncs["full"] + syncs["lora_adapter"] + syncs["lora_merged"]
    note = (f"per sync: adapter {med('lora_adapter', 'bytes') / 2**20:.2f} MiB in {med('lora_adapter', 'total_s'):.3f} s, "
            f"full weights {med('full', 'bytes') / 2**20:.1f} MiB in {med('full', 'total_s'):.3f} s, LoRA merged "
            f"{med('lora_merged', 'bytes') / 2**20:.1f} MiB in {med('lora_merged', 'total_s'):.3f} s")
    return [
        result("lora_sync_bytes_vs_full", med("lora_adapter", "bytes"), med("full", "bytes"), "bytes/sync", 0.1,
               sync_samples, lower_is_better=True, config=config, note=note),
        result("lora_sync_time_vs_full", med("lora_adapter", "total_s"), med("full", "total_s"), "s/sync", 0.5,
               sync_samples, lower_is_better=True, config=config, note=note,
               spread=spread([a / f for a, f in zip(adapter_s, full_s)])),
        # reported, not targeted: the issue asks for the figure, and what LoRA saves (gradients and Adam state of the
        # base) is a model-size-dependent share of a peak that also holds weights, activations and the libraries
        result("lora_learner_memory_vs_full", peak("lora_adapter"), peak("full"), "GiB peak", None, memory,
               lower_is_better=True, config=config,
               note=f"learner step peak RSS: LoRA {peak('lora_adapter'):.2f} GiB, full {peak('full'):.2f} GiB"),
    ]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("full", "lora_adapter"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--response-len", type=int, default=48, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.response_len)))
        return
    from benchmarks.common import ray_start

    ray_start()
    print(json.dumps(run(args.quick)))


if __name__ == "__main__":
    main()
