"""Rollout scaling: tokens/s through Relay's rollout actors with 1, 2 and 4 actors generating at once.

All actors start up front, each reserving an equal share of the machine's CPUs
(0.5 each for 4 actors on 2 cores), so every count runs in the same processes;
the driver keeps every chosen actor busy with requests of the default job's
size. On a machine with C cores the curve can rise at most until C actors;
past that the engines only share the same cores.

    .venv/bin/python -m benchmarks.scaling [--quick]
"""
from __future__ import annotations

import os
import statistics

import ray

from actors.config import ActorConfig
from benchmarks.common import default_job_model, module_main, result, spread
from benchmarks.rollout import make_requests, relay_tokens_per_s, sink_buffer, start_actors


def saturation_note(per_count: dict[int, float], cores: int) -> str:
    """Where adding actors stops paying: the first count after which one more step gains under 10%."""
    counts = sorted(per_count)
    sat = next((a for a, b in zip(counts, counts[1:]) if per_count[b] < 1.1 * per_count[a]), counts[-1])
    gains = ", ".join(f"{n}: {per_count[n] / per_count[counts[0]]:.2f}x" for n in counts)
    return (f"tokens/s relative to {counts[0]} actor ({gains}); saturates at {sat} actor(s) on {cores} cores: "
            f"each engine decodes on one OpenMP thread, so past {cores} actors they only share the same cores")


def run(quick: bool) -> dict:
    counts, requests_per_actor, repeats = ((1, 2), 2, 1) if quick else ((1, 2, 4), 4, 3)
    cores = len(os.sched_getaffinity(0))
    cfg = ActorConfig(num_cpus=cores / max(counts))
    buffer = sink_buffer()
    model_path = default_job_model(quick)
    actors = start_actors(cfg, model_path, max(counts))
    try:
        relay_tokens_per_s(actors, buffer, make_requests(model_path, len(actors), cfg.prompts_per_request))  # warm every engine
        samples = []
        for k in range(repeats):
            for n in counts if k % 2 == 0 else counts[::-1]:
                tokens, secs = relay_tokens_per_s(actors[:n], buffer, make_requests(model_path, n * requests_per_actor, cfg.prompts_per_request, k))
                samples.append({"actors": n, "tokens_per_s": round(tokens / secs, 1), "tokens": tokens})
    finally:
        for a in (*actors, buffer):
            ray.kill(a)
    per_count = {n: statistics.median(s["tokens_per_s"] for s in samples if s["actors"] == n) for n in counts}
    one, most = per_count[counts[0]], per_count[counts[-1]]
    return result("rollout_scaling", most, one, "tokens/s", None, samples,
                  spread=spread([s["tokens_per_s"] for s in samples if s["actors"] == counts[-1]]),
                  tokens_per_s_by_actors={str(n): v for n, v in per_count.items()},
                  note=saturation_note(per_count, cores),
                  config={"cores": cores, "num_cpus_per_actor": cfg.num_cpus, "requests_per_actor": requests_per_actor,
                          "prompts_per_request": cfg.prompts_per_request, "n": cfg.n, "max_tokens": cfg.max_tokens})


if __name__ == "__main__":
    module_main(run, __doc__)
