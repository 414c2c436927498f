"""Reward offload: a rollout actor's samples/s with a learned judge in the judge service vs the same judge inline.

Both paths are the same rollout actor (the default job's tiny policy and sampling: 16 prompts x 8 samples per
request, two requests queued as the launcher keeps them) and the same judge (a randomly initialised Qwen2 sequence
classifier with the default job's tokenizer; its size sets how much scoring costs), on this machine, alternately:

- service: `model:rm` rows go unscored to the judge service (one judge actor, its own CPU); the actor starts its
  next request at once, and a request is done when the service's put to the buffer is acknowledged;
- inline (baseline): the actor holds its own copy of the judge and scores inside `generate` before its put.

value / baseline: median samples/s (service / inline), from the first request sent to the last acknowledgement
(with one judge actor, the judge bounds this once it is slower than sampling). `actor_samples_per_s_*`: the rollout
actor's own rate, samples over the time until its last request returned.
Also per path: the rollout actor's idle fraction, 1 - (time spent sampling) / (time until its last request
returned), where a request's sampling time is its `gen_s - score_s`: while an actor scores inline its engine samples
nothing, as while it waits for a Ray call. `*_ack_tail_s`: from the actor's last return to the last
acknowledgement (the service still scoring; the actor could already sample a next request).

    .venv/bin/python -m benchmarks.reward_offload [--quick]
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import ray

from actors.actor import make_rollout_actor, start_request
from actors.config import ActorConfig
from actors.generator import GenerationResult
from actors.reward_config import RewardModelConfig
from benchmarks.common import CACHE, default_job_model, module_main, result, spread
from benchmarks.rollout import MAX_MODEL_LEN, make_requests, sink_buffer
from transport.registry import make_transport


def build_bench_judge(hidden: int, layers: int, cache: Path = CACHE) -> str:
    """A random Qwen2ForSequenceClassification (one output) of the given shape, with the default job's tokenizer and
    its chat template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from launch.config import ModelConfig
    from launch.model import build_default_model

    out = cache / f"bench-judge-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(build_default_model(ModelConfig(warm_start_steps=0), 9, cache))
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             head_dim=64, max_position_embeddings=128, num_labels=1, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        Qwen2ForSequenceClassification(config).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    return str(out)


def drive(actor, sink, requests: list, depth: int) -> dict:
    """Samples, wall seconds (until `sink` acknowledged every put) and seconds spent sampling, over the requests."""
    t0 = time.perf_counter()
    pending, inflight, acks = list(requests), {}, []
    samples = sampling = 0.0

    def submit():
        ref, ack = start_request(actor, sink, pending.pop(0), None, f"bench-{time.monotonic_ns()}")
        inflight[ref] = True
        acks.append(ack)

    for _ in range(min(depth, len(pending))):
        submit()
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        del inflight[ref]
        res = GenerationResult.of(ray.get(ref))
        samples += res.groups * ActorConfig().n
        sampling += res.gen_s - res.score_s
        if pending:
            submit()
    generating = time.perf_counter() - t0  # the actor's part: after this it holds no request
    stored = ray.get(acks)
    assert all(s >= 0 for s in stored), stored  # every request reached the buffer once
    wall = time.perf_counter() - t0
    return {"samples": samples, "wall_s": wall, "idle": max(0.0, 1.0 - sampling / generating),
            "ack_tail_s": wall - generating}


def run(quick: bool) -> dict:
    from actors.judge_pool import make_judge_service

    n_requests, repeats = (3, 2) if quick else (8, 5)
    hidden, layers = (128, 2) if quick else (256, 4)
    # the default job's sampling, every sample judged; half a CPU each, so both actors and the judge fit on 2 cores
    cfg = ActorConfig(reward="model:rm", num_cpus=0.5)
    model_path, judge_path = default_job_model(quick), build_bench_judge(hidden, layers)
    judge_cfg = RewardModelConfig(path=judge_path, num_cpus=cfg.num_cpus)
    buffer = sink_buffer()
    service = make_judge_service({"rm": (judge_cfg, judge_path)}, buffer, None, startup_timeout_s=600)
    ray.get(service.start.remote(), timeout=600)
    common = dict(model_path=model_path, max_model_len=MAX_MODEL_LEN,
                  transport=make_transport("object_store", ""), fetch_timeout_s=600)
    actors = {"service": make_rollout_actor(cfg, "gen-service", judges=service, **common),
              "inline": make_rollout_actor(cfg, "gen-inline", local_judges={"rm": (judge_cfg, judge_path)}, **common)}
    try:
        ray.get([a.version.remote() for a in actors.values()])  # engines (and the inline judge) up first
        warm = make_requests(model_path, 1, cfg.prompts_per_request)
        sinks = {"service": service, "inline": buffer}  # the service scores, then puts; inline rows are scored
        for which, a in actors.items():
            drive(a, sinks[which], warm, 1)  # first calls compile/allocate
        samples = []
        for k in range(repeats):
            requests = make_requests(model_path, n_requests, cfg.prompts_per_request, offset=k * 7)
            s = {}
            for which in (("service", "inline") if k % 2 == 0 else ("inline", "service")):
                out = drive(actors[which], sinks[which], requests, cfg.requests_per_actor)
                s[which] = round(out["samples"] / out["wall_s"], 1)
                s[f"{which}_wall_s"], s[f"{which}_idle"] = round(out["wall_s"], 3), round(out["idle"], 3)
                s[f"{which}_ack_tail_s"] = round(out["ack_tail_s"], 3)
                # the actor's own rate: samples over the time until its last request returned
                s[f"{which}_actor_sps"] = round(out["samples"] / (out["wall_s"] - out["ack_tail_s"]), 1)
            samples.append(s)
    finally:
        ray.get(service.close.remote())
        for a in (*actors.values(), service, buffer):
            ray.kill(a)
    value = statistics.median(s["service"] for s in samples)
    baseline = statistics.median(s["inline"] for s in samples)
    return result("reward_offload", value, baseline, "samples/s", 1.0, samples,
                  spread=spread([s["service"] / s["inline"] for s in samples]),
                  idle_fraction_service=statistics.median(s["service_idle"] for s in samples),
                  idle_fraction_inline=statistics.median(s["inline_idle"] for s in samples),
                  actor_samples_per_s_service=statistics.median(s["service_actor_sps"] for s in samples),
                  actor_samples_per_s_inline=statistics.median(s["inline_actor_sps"] for s in samples),
                  config={"model": model_path, "judge": judge_path, "n": cfg.n, "max_tokens": cfg.max_tokens,
                          "prompts_per_request": cfg.prompts_per_request, "requests_per_sample": n_requests,
                          "judge_actors": 1, "cpus_per_actor": cfg.num_cpus})


if __name__ == "__main__":
    module_main(run, __doc__)
