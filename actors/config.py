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
    resources: dict[str, float] = {}
    """Ray custom resources each rollout actor reserves, e.g. {rollout_node: 1} to keep rollouts on nodes started
    with `ray start --resources '{"rollout_node": 8}'` (node types, spot pools, an autoscaler's worker group)."""
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
    """Longest response, in tokens (must leave room for a prompt inside model.max_model_len)."""
    stop: list[str] = []
    """Strings that end a response (e.g. "</answer>"). The response keeps the stop string, in its tokens and its
    text alike, so the reward reads what the tokens the learner trains on spell."""
    stop_token_ids: list[int] = []
    """Token ids that end a response besides the model's EOS (e.g. a chat model's end-of-turn token)."""
    reward: str | dict[str, str] = "arithmetic"
    """Builtin reward (arithmetic, math_verify) or path/to/file.py:function; or a mapping data_source -> such a
    spec, with `default` for sources not named (see actors/rewards.py for the arguments a function receives)."""
    kv_cache_gib: int = Field(1, ge=1)
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may take (weights, activations, KV cache; GPU only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weights and activations: auto is bfloat16 on GPU (num_gpus > 0) and float32 on CPU. The learner's
    log-probs are float32 either way, so bf16 sampling widens the gap between behaviour and recomputed log-probs."""
    enforce_eager: Literal["auto", True, False] = "auto"
    """Run the model eagerly (true) or with CUDA graphs (false); auto is eager on CPU, CUDA graphs on GPU."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one rollout actor's engine spans (vLLM tensor parallelism through its Ray executor). Above 1, each
    actor reserves its own placement group of that many {GPU: 1} bundles on one node; num_gpus must then be 1."""
    enable_prefix_caching: bool = True
    """Reuse prompt KV blocks across the n samples; the cache is reset on every weight update."""
    seed: int = 0
    """Base seed; each actor derives its own so actors do not draw the same samples (defaults to the run's seed)."""
    weight_update_mode: Literal["between_batches", "in_flight"] = "between_batches"
    """When new weights reach an engine: between requests, or in_flight (pause, load, resume; per-token versions)."""
    cpu_weight_layout: Literal["plain", "packed"] = "plain"
    """CPU engines: plain keeps linear weights in PyTorch layout so an update is an in-place copy (an eager engine's
    layer packs a private copy of a version once it has served 16 calls); packed is vLLM's default (vLLM's
    layerwise reload and a oneDNN repack at every load). See transport/plain_weights.py. Ignored on GPU."""
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


def resolved_dtype(cfg: ActorConfig) -> str:
    """`actors.dtype`, with auto resolved: bfloat16 where the actor has GPUs, float32 on CPU (the tiny CPU runs
    compare behaviour log-probs with the learner's to 1e-4, which bf16 cannot meet)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if cfg.num_gpus > 0 else "float32"


def resolved_eager(cfg: ActorConfig) -> bool:
    """`actors.enforce_eager`, with auto resolved: CUDA graphs on GPU (decode is launch-bound without them),
    eager on CPU (there are no graphs to capture)."""
    if cfg.enforce_eager != "auto":
        return cfg.enforce_eager
    return cfg.num_gpus <= 0
