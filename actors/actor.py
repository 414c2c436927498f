"""The rollout actor: a thin Ray shell around `Generator` that also talks to the buffer and the transport."""
from __future__ import annotations

import os
import time

import ray

from actors.config import ActorConfig
from actors.generator import GenerationResult, Generator, Prompt
from transport.weights import WeightHandle, WeightTransport


class RolloutActor:
    """Owns one vLLM engine. Between requests (its safe point) it applies the newest weights it was handed."""

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int,
                 buffer, transport: WeightTransport, fetch_timeout_s: float):
        self.gen = Generator(cfg, model_path, generator_id, max_model_len)
        self.buffer, self.transport, self.fetch_timeout_s = buffer, transport, fetch_timeout_s

    def sync(self, handle: WeightHandle | None) -> float:
        """Apply `handle` if it is newer than what this engine serves; intermediate versions are simply never fetched."""
        if handle is None or handle.version <= self.gen.version:
            return 0.0
        t0 = time.perf_counter()
        self.gen.load_weights(handle.version, self.transport.fetch(handle, self.fetch_timeout_s))
        return time.perf_counter() - t0

    def generate(self, prompts: list[Prompt], handle: WeightHandle | None, put_timeout_s: float,
                 request_id: str | None = None) -> GenerationResult:
        """Sample, score and push one request's groups. The put carries `request_id`, so the buffer refuses a
        second copy of a request the launcher re-issued after believing this actor dead."""
        load_s = self.sync(handle)
        result = self.gen.generate(prompts)
        result.load_s = load_s
        if result.batch is not None or request_id is not None:
            put = self.buffer.put.remote(result.batch, None, request_id, result.skipped)
            result.duplicate = ray.get(put, timeout=put_timeout_s) < 0
        result.batch = None  # the rows went to the buffer; only the summary returns to the launcher
        return result

    def evaluate(self, prompts: list[Prompt], handle: WeightHandle | None) -> dict[str, float]:
        self.sync(handle)
        return {**self.gen.evaluate(prompts), "eval/policy_version": self.gen.version}

    def version(self) -> int:
        return self.gen.version

    def pid(self) -> int:
        """The worker process id (operators and fault-injection tests kill it from outside)."""
        return os.getpid()


def make_rollout_actor(cfg: ActorConfig, index: int, **kwargs):
    """Each actor requests its own resources, so an autoscaler can add nodes for rollouts alone."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
           "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cls = ray.remote(RolloutActor).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, name=None, max_restarts=0,
        runtime_env={"env_vars": env},
    )
    return cls.remote(cfg, generator_id=f"gen-{index}", **kwargs)
