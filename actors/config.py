"""Rollout actor configuration."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ActorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(1, ge=1)
    """Rollout actors (each owns one vLLM engine); scales independently of the learner."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each rollout actor reserves from Ray."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each rollout actor reserves (0 on CPU machines)."""
    prompts_per_request: int = Field(16, ge=1)
    """Prompt groups one generation request carries (the unit of admission and of work re-issue)."""
    n: int = Field(8, ge=1)
    """Generations sampled per prompt (the group size)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the recorded behaviour log-probs are under this tempered distribution."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off)."""
    top_k: int = Field(0, ge=0)
    """Top-k truncation (0 = off)."""
    max_tokens: int = Field(8, ge=1)
    """Longest response, in tokens."""
    reward: str | dict[str, str] = "arithmetic"
    """Builtin reward (arithmetic, math_verify) or path/to/file.py:function; or a mapping data_source -> such a
    spec, with `default` for sources not named (see actors/rewards.py for the arguments a function receives)."""
    kv_cache_gib: int = Field(1, ge=1)
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (GPU only)."""
    enable_prefix_caching: bool = True
    """Reuse prompt KV blocks across the n samples; the cache is reset on every weight update."""
    seed: int = 0
    """Base seed; each actor derives its own so actors do not draw the same samples (defaults to the run's seed)."""
    weight_update_mode: Literal["between_batches", "in_flight"] = "between_batches"
    """When new weights reach an engine: between requests, or in_flight (pause, load, resume; per-token versions)."""
    cpu_weight_layout: Literal["plain", "packed"] = "plain"
    """CPU engines: plain keeps linear weights in PyTorch layout so an update is an in-place copy; packed is vLLM's
    default (oneDNN repack at every load, 6-10x the copy). See transport/plain_weights.py. Ignored on GPU."""
    requests_per_actor: int = Field(2, ge=1, le=8)
    """Generation requests the launcher keeps queued on each rollout actor. With 2 the next request is already
    waiting when one finishes, so the engine never idles for a Ray round trip; each request samples with the newest
    weights it was sent with (the staleness bound holds either way). in_flight actors take 1, their default."""
    max_failures: int = Field(3, ge=1)
    """A rollout actor that fails (dies, errors, or overruns ray.rpc_timeout_s) this many times in a row stops the run."""

    @model_validator(mode="after")
    def _in_flight_serves_one_request_at_a_time(self) -> "ActorConfig":
        # an in_flight actor is threaded (weights arrive during a request): queued requests would run concurrently
        if self.weight_update_mode == "in_flight" and self.requests_per_actor > 1:
            if "requests_per_actor" in self.model_fields_set:
                raise ValueError("actors.requests_per_actor must be 1 with weight_update_mode in_flight")
            self.requests_per_actor = 1
        return self
