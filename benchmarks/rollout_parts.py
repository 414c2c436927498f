"""Where `rollout_vs_bare_vllm`'s gap goes: the same requests timed at each layer Relay adds to bare vLLM.

A diagnostic, not one of the suite's ratios (`python -m benchmarks.rollout_parts [--quick]`, ~1 min). Three
actors with the default job's model and sampling, each half a CPU so all fit on 2 cores (Ray does not pin
them; each engine runs one thread), take the same requests in turn, and each row adds one layer:

- `bare_packed`: `LLM.generate` per request in its own actor, vLLM's packed CPU weights (the benchmark's baseline);
- `bare_plain`: the same with Relay's plain layout (`actors.cpu_weight_layout`: weights updated by a copy);
- `bare_in_relay_actor`: `LLM.generate` inside Relay's rollout actor, nothing else running;
- `engine_in_relay_request`: the engine's `sample` inside Relay's own requests, while the launcher-side calls,
  the buffer's puts and Ray's threads run beside it;
- `relay_generate`: the whole `Generator.generate` (prompt checks, scoring, columns, the Arrow batch);
- `relay_path`: what the driver sees, as `benchmarks.rollout` times it (the Ray calls, two return values, the
  put's answer, pipeline fill and drain).

Every row uses Relay's sampling params (vLLM's detokenizer off, each request decoded in one batch), as
`benchmarks.rollout`'s baseline does. Medians over interleaved repeats, in ms per request, and each layer's share
of `relay_path`'s excess over `bare_packed`.
"""
from __future__ import annotations

import statistics
import time

import ray

from actors.actor import RolloutActor, rollout_actor_options
from actors.config import ActorConfig
from benchmarks.common import VLLM_ENV, default_job_model, module_main
from benchmarks.rollout import MAX_MODEL_LEN, BareVLLM, make_requests, relay_tokens_per_s, sink_buffer
from transport.registry import make_transport

LAYERS = ("bare_packed", "bare_plain", "bare_in_relay_actor", "engine_in_relay_request", "relay_generate",
          "relay_path")


class TimedRolloutActor(RolloutActor):
    """Relay's rollout actor, also timing its engine's `sample` calls and able to run the bare loop itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_s, engine = 0.0, self.gen.engine
        sample = engine.sample

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return sample(*a, **k)
            finally:
                self.sample_s += time.perf_counter() - t0

        engine.sample = timed
        self.params = self.gen.sampling_params()  # for `bare`: as BareVLLM holds them

    def take_sample_s(self) -> float:
        out, self.sample_s = self.sample_s, 0.0
        return out

    def bare(self, requests) -> tuple[int, float]:
        return BareVLLM.generate(self, requests)  # the baseline's loop, on this actor's engine (self.gen)


def run(quick: bool) -> dict:
    n_requests, repeats = (2, 2) if quick else (8, 12)
    cfg = ActorConfig(num_cpus=0.5)  # three engines on 2 cores; the default job's sampling otherwise
    model_path = default_job_model(quick)
    buffer = sink_buffer()
    relay = ray.remote(TimedRolloutActor).options(**rollout_actor_options(cfg)).remote(
        cfg, model_path, "gen-0", MAX_MODEL_LEN, make_transport("object_store", ""), 120)
    bare = {layout: ray.remote(BareVLLM).options(num_cpus=cfg.num_cpus, runtime_env={"env_vars": VLLM_ENV})
            .remote(cfg, model_path, layout) for layout in ("packed", "plain")}
    try:
        warm = make_requests(model_path, 1, cfg.prompts_per_request)
        relay_tokens_per_s([relay], buffer, warm)
        ray.get([relay.bare.remote(warm), relay.take_sample_s.remote(), *(b.generate.remote(warm) for b in bare.values())])
        per = {k: [] for k in LAYERS}
        for k in range(repeats):
            requests = make_requests(model_path, n_requests, cfg.prompts_per_request, offset=k * 7)
            order = ["relay", "packed", "plain", "in_relay"]
            for which in order[k % 4:] + order[:k % 4]:  # none always first
                if which == "relay":
                    parts = {}
                    per["relay_path"].append(relay_tokens_per_s([relay], buffer, requests, parts)[1])
                    per["relay_generate"].append(parts["gen_s"])
                    per["engine_in_relay_request"].append(ray.get(relay.take_sample_s.remote()))
                elif which == "in_relay":
                    per["bare_in_relay_actor"].append(ray.get(relay.bare.remote(requests))[1])
                else:
                    per[f"bare_{which}"].append(ray.get(bare[which].generate.remote(requests))[1])
    finally:
        for a in (relay, *bare.values(), buffer):
            ray.kill(a)
    ms = {k: statistics.median(v) / n_requests * 1000 for k, v in per.items()}
    excess = ms["relay_path"] - ms["bare_packed"]
    shares = {b: (ms[b] - ms[a]) / excess if excess > 0 else None for a, b in zip(LAYERS, LAYERS[1:])}
    return {"name": "rollout_parts", "ms_per_request": {k: round(v, 3) for k, v in ms.items()},
            "share_of_excess": {k: None if v is None else round(v, 3) for k, v in shares.items()},
            "ratio_bare_over_relay": round(ms["bare_packed"] / ms["relay_path"], 4),
            "samples_s": {k: [round(x, 4) for x in v] for k, v in per.items()},
            "config": {"model": model_path, "requests_per_repeat": n_requests, "repeats": repeats,
                       "num_cpus_each": cfg.num_cpus}}


if __name__ == "__main__":
    module_main(run, __doc__)
