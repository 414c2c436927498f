"""Rollout path vs bare vLLM: tokens/s through Relay's rollout actor against `LLM.generate` alone.

Relay's path is everything a request costs: the Ray call, sampling with
behaviour log-probs, scoring, the Arrow record batch and the buffer insert
(acknowledged; submitted with the request, as the launcher does:
`actors.actor.start_request`), timed from the driver, with as many requests queued per actor
as the launcher keeps (`actors.requests_per_actor`). The baseline is the same engine's `LLM.generate` on the same
token prompts and `SamplingParams`, with vLLM's own CPU weight layout (packed), each request's texts decoded once as
Relay's engine decodes them, timed inside its own actor (so no Ray call is in it), in the same environment.
Relay's plain layout (a weight update is a copy) is part of what is compared; no version is loaded during the
benchmark, so its layers run on packed copies after their first 16 calls (`transport/plain_weights.py`), as in a
run whose versions each serve more than one short request (the default job loads one every request and stays on the
per-call path: ~1.1 ms a request, about what a pack, ~1.3 ms, would cost it). A third path, bare vLLM with its own
detokenizer on (vLLM's default, which Relay turns off: actors/generator.py), is reported beside it
(`ratio_vs_bare_vllm_detokenizer`): that ratio includes what Relay's decoding saves, the target's does not.
The three paths run the default job's model and sampling settings, in turn (`rollout_vs_bare_vllm`, the target),
and then the same sampling with long responses from an untrained model of the same shape
(`rollout_vs_bare_vllm_long`: ~9x the tokens a request), which tells a cost per request from one per token.

    .venv/bin/python -m benchmarks.rollout [--quick]
"""
from __future__ import annotations

import functools
import statistics
import time

import ray

from actors.actor import make_rollout_actor, start_request
from actors.config import ActorConfig
from actors.engines import response_texts
from actors.generator import GenerationResult, Generator, Prompt
from benchmarks.common import VLLM_ENV, build_bench_model, default_job_model, module_main, result, spread
from buffer.actor import make_buffer_actor
from buffer.config import BufferConfig
from launch.config import load_config
from launch.run_data import prepare_prompts
from transport.registry import make_transport

MAX_MODEL_LEN = 64
LONG_MAX_MODEL_LEN, LONG_MAX_TOKENS = 128, 112  # the bench model's whole context (max_position_embeddings)


class BareVLLM:
    """The baseline: a Generator's own engine, called with `LLM.generate` and nothing around it, with vLLM's
    own CPU weight layout (packed; `layout` plain for benchmarks.rollout_parts), so Relay's plain layout is part of
    what is compared. Relay's sampling params, so vLLM's detokenizer is off and each request's responses are
    decoded in one batch call, as Relay's engine does (actors/engines.py `response_texts`); `detokenize`: vLLM's
    default instead, its detokenizer decoding every token as it comes."""

    def __init__(self, cfg: ActorConfig, model_path: str, layout: str = "packed", max_model_len: int = MAX_MODEL_LEN,
                 detokenize: bool = False):
        cfg = cfg.model_copy(update={"cpu_weight_layout": layout})
        self.gen = Generator(cfg, model_path, "gen-0", max_model_len)  # same engine args and seed as Relay's actor 0
        self.params = self.gen.sampling_params()
        self.params.detokenize = self.params.detokenize or detokenize

    def generate(self, requests: list[list[Prompt]]) -> tuple[int, float]:
        """(response tokens, seconds) over the requests, one `LLM.generate` each, as the rollout actor issues them,
        each response's text included."""
        token_prompts = [[{"prompt_token_ids": self.gen.encode(p)} for p in r]
                         for r in requests]  # the token ids the launcher rendered, as Relay's actor receives them
        llm, tokenizer = self.gen.engine.llm, self.gen.engine.tokenizer
        t0 = time.perf_counter()
        outs = []
        for tp in token_prompts:
            outs.append(llm.generate(tp, self.params, use_tqdm=False))
            response_texts(tokenizer, self.params, [c for o in outs[-1] for c in o.outputs])  # as Relay's engine
        elapsed = time.perf_counter() - t0
        return sum(len(c.token_ids) for batch in outs for o in batch for c in o.outputs), elapsed


@functools.lru_cache(maxsize=4)
def launcher_prompts(model_path: str) -> list[Prompt]:
    """The default job's prompts as the launcher hands them to actors (`launch.run_data.prepare_prompts`: rendered
    once, at load, with the run's tokenizer), so a request carries its token ids and no actor tokenizes them again."""
    cfg = load_config("configs/default.yaml", {"model.max_model_len": MAX_MODEL_LEN})
    return prepare_prompts(cfg, model_path).train.prompts


def make_requests(model_path: str, n_requests: int, prompts_per_request: int, offset: int = 0) -> list[list[Prompt]]:
    prompts = launcher_prompts(model_path)
    flat = [prompts[(offset + i) % len(prompts)] for i in range(n_requests * prompts_per_request)]
    return [flat[i : i + prompts_per_request] for i in range(0, len(flat), prompts_per_request)]


def sink_buffer():
    """A buffer that accepts every put (no admission, no limiter) and evicts the oldest: the actors' sink."""
    cfg = BufferConfig(capacity_groups=4096, staleness_policy="drop", max_staleness=10**9)
    return make_buffer_actor(cfg, groups_per_step=1, run_dir=None)


def start_actors(cfg: ActorConfig, model_path: str, count: int, transport=None, max_model_len: int = MAX_MODEL_LEN) -> list:
    transport = transport or make_transport("object_store", "")
    actors = [make_rollout_actor(cfg, i, model_path=model_path, max_model_len=max_model_len,
                                 transport=transport, fetch_timeout_s=120) for i in range(count)]
    ray.get([a.version.remote() for a in actors])  # engines up before any clock starts
    return actors


def relay_tokens_per_s(actors: list, buffer, requests: list[list[Prompt]], parts: dict | None = None,
                       depth: int = ActorConfig().requests_per_actor) -> tuple[int, float]:
    """(tokens, seconds) for the requests spread over the actors, each actor holding up to `depth` of its share
    at a time as the launcher does (`actors.requests_per_actor`), until the buffer acknowledged every put (as the
    launcher waits for them); `parts` collects where an actor's time went (summed over requests): generating
    (`gen_s`) and waiting for acknowledgements after the last generation returned (`ack_tail_s`, the only part
    of the puts not overlapped with sampling)."""
    t0 = time.perf_counter()
    pending = {a: requests[i :: len(actors)] for i, a in enumerate(actors)}
    ids = iter(range(10**9))
    inflight = {}

    acks = []

    def submit(actor):
        ref, ack = start_request(actor, buffer, pending[actor].pop(0), None, f"bench-{next(ids)}")
        inflight[ref] = actor
        acks.append(ack)

    for a in actors:
        for _ in range(min(depth, len(pending[a]))):
            submit(a)
    tokens = 0
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        actor = inflight.pop(ref)
        res = GenerationResult.of(ray.get(ref))
        tokens += res.tokens
        if parts is not None:
            parts["gen_s"] = parts.get("gen_s", 0.0) + res.gen_s
        if pending[actor]:
            submit(actor)
    t_gen = time.perf_counter()
    ray.get(acks)
    if parts is not None:
        parts["ack_tail_s"] = parts.get("ack_tail_s", 0.0) + time.perf_counter() - t_gen
    return tokens, time.perf_counter() - t0


def compare(cfg: ActorConfig, model_path: str, max_model_len: int, n_requests: int, repeats: int) -> list[dict]:
    """Interleaved repeats of the three paths on the same requests: one sample (tokens/s of each, Relay's parts) a
    repeat. Each path has its own engine, and all three see the same requests in the same order, so they sample
    the same tokens."""
    buffer = sink_buffer()
    [relay] = start_actors(cfg, model_path, 1, max_model_len=max_model_len)
    # the two bare engines reserve half a CPU each so all three fit on 2 (Ray does not pin them; every engine runs
    # one thread, OMP_NUM_THREADS=1, whatever its reservation)
    bare = {name: ray.remote(BareVLLM).options(num_cpus=cfg.num_cpus / 2, runtime_env={"env_vars": VLLM_ENV}).remote(
        cfg, model_path, max_model_len=max_model_len, detokenize=name == "bare_vllm_detokenizer")
        for name in ("bare", "bare_vllm_detokenizer")}
    try:
        warm = make_requests(model_path, 1, cfg.prompts_per_request)
        relay_tokens_per_s([relay], buffer, warm), ray.get([b.generate.remote(warm) for b in bare.values()])  # compile, allocate
        samples = []
        for k in range(repeats):
            requests = make_requests(model_path, n_requests, cfg.prompts_per_request, offset=k * 7)
            order = ["relay", "bare", "bare_vllm_detokenizer"]
            s, parts = {}, {}
            for which in order[k % 3:] + order[:k % 3]:  # none always goes first
                tokens, secs = relay_tokens_per_s([relay], buffer, requests, parts) if which == "relay" else ray.get(bare[which].generate.remote(requests))
                s[which] = round(tokens / secs, 1)
                s[f"{which}_tokens"] = tokens
                s[f"{which}_s"] = round(secs, 4)
            s.update({f"relay_{k}": round(v, 4) for k, v in parts.items()})  # the rest of relay_s: Ray calls
            samples.append(s)
    finally:
        for a in (relay, *bare.values(), buffer):
            ray.kill(a)
    return samples


def _row(name: str, target: float | None, samples: list[dict], config: dict) -> dict:
    value = statistics.median(s["relay"] for s in samples)
    baseline = statistics.median(s["bare"] for s in samples)
    detokenizing = statistics.median(s["bare_vllm_detokenizer"] for s in samples)
    return result(name, value, baseline, "tokens/s", target, samples,
                  spread=spread([s["relay"] / s["bare"] for s in samples]), config=config,
                  # against vLLM's default path, its detokenizer decoding every token
                  ratio_vs_bare_vllm_detokenizer=round(value / detokenizing, 4))


def run(quick: bool) -> list[dict]:
    """The default job's requests (the target), then the same sampling with long responses: together the two rows
    tell a cost per request from one per token. Values/baselines are median tokens/s."""
    # 16 requests a repeat: Relay's timing starts with an idle actor and ends with the last put's answer (~3 ms of
    # pipeline fill and drain a repeat, which a run pays once, not every few requests; with 8 requests that was
    # ~1.3% of Relay's time). 12 repeats: at 5 short ones the paired ratios ranged 0.72-1.11 on an idle machine
    n_requests, repeats = (2, 2) if quick else (16, 12)
    cfg = ActorConfig()  # the default job's sampling: n=8, 16 prompts per request, max 8 tokens, temperature 1
    model_path = default_job_model(quick)
    short = _row("rollout_vs_bare_vllm", 0.9, compare(cfg, model_path, MAX_MODEL_LEN, n_requests, repeats),
                 {"model": model_path, "n": cfg.n, "max_tokens": cfg.max_tokens,
                  "prompts_per_request": cfg.prompts_per_request, "requests_per_sample": n_requests})
    # long responses: the default job's model shape, untrained (no learned answer format: ~18 tokens a sample here,
    # at most LONG_MAX_TOKENS), so a request generates ~9x the tokens of the default job's (~2.4 a sample)
    long_cfg = cfg.model_copy(update={"max_tokens": 16 if quick else LONG_MAX_TOKENS})
    long_path, _ = build_bench_model(128, 2)
    n_requests, repeats = (1, 2) if quick else (3, 6)
    long = _row("rollout_vs_bare_vllm_long", None, compare(long_cfg, long_path, LONG_MAX_MODEL_LEN, n_requests, repeats),
                {"model": long_path, "n": cfg.n, "max_tokens": long_cfg.max_tokens,
                 "prompts_per_request": cfg.prompts_per_request, "requests_per_sample": n_requests})
    return [short, long]


if __name__ == "__main__":
    module_main(run, __doc__)
