"""The vLLM engines a `Generator` samples from: what they share and the synchronous one.

A `Generator` (actors/generator.py) owns everything about a rollout -- prompt encoding, sampling
params, grouping, rewards, skip rules, versions and the weight-update safety checks -- and holds one
engine that only samples and swaps weights:

- `SyncEngine` (here): vLLM's `LLM` in this process. Weights change between batches, by copy
  (transport/plain_weights.py), by vLLM's layerwise reload, through a shared-memory slot, or pushed
  through vLLM's weight-transfer engine API (NCCL on GPU, `relay_cpu` on one CPU host); with LoRA adapter
  sync the base stays and each version is a new adapter every request uses (`load_adapter`).
- `AsyncEngine` (actors/inflight.py): vLLM's `AsyncLLM` on a background event loop, so weights can
  change while a batch is being sampled, and every token carries the version that sampled it.

Both are built from the same `engine_args`, so the two modes cannot drift apart in dtype, log-prob
mode or seed, and both return the same `Output` records.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.config import ActorConfig, resolved_dtype, resolved_eager
from transport.plain_weights import layout_of, load_in_place, point_at, set_cpu_weight_layout


def actor_seed(cfg: ActorConfig, generator_id: str) -> int:
    """Each actor's own seed: identical prompts with one seed would draw identical samples on every actor."""
    return cfg.seed + zlib.crc32(generator_id.encode()) % 10_000


def parallel_args(cfg: ActorConfig) -> dict:
    """Tensor parallelism through vLLM's own Ray executor: its workers take the GPU bundles of the placement group
    this actor runs in (actors/actor.py reserves one per actor). With one GPU nothing changes."""
    if cfg.tensor_parallel_size == 1:
        return {}
    return dict(tensor_parallel_size=cfg.tensor_parallel_size, distributed_executor_backend="ray")


def engine_args(cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, **extra) -> dict:
    """vLLM engine arguments of every generator, whichever engine runs them."""
    return dict(
        model=model_path,
        dtype=resolved_dtype(cfg),
        enforce_eager=resolved_eager(cfg),
        max_model_len=max_model_len,
        # the sampled token's log-prob under the distribution actually sampled from (temperature, top-k/p
        # applied): the behaviour policy mu that off-policy corrections divide by
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=cfg.enable_prefix_caching,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        seed=actor_seed(cfg, generator_id),
        **parallel_args(cfg),
        **extra,
    )


def sampled_logprobs(token_ids, logprobs) -> list[float]:
    """(T,) each sampled token's log-prob, from vLLM's per-position entries (`SamplingParams(logprobs=0)`: the
    sampled token's own entry only). `flat_logprobs` output holds them as one flat list already, read as is; a
    per-position {token_id: Logprob} would cost a dict and an object per token."""
    from vllm.logprobs import FlatLogprobs

    if isinstance(logprobs, FlatLogprobs) and logprobs.token_ids == list(token_ids):  # one entry per position
        return list(logprobs.logprobs)
    return [lp[tok].logprob for lp, tok in zip(logprobs, token_ids)]


def response_texts(tokenizer, params, completions) -> list[str]:
    """Each completion's text: vLLM's own where it detokenized (`params.detokenize`), else its token ids decoded
    in one batch call, as vLLM's detokenizer would decode them (special tokens skipped unless asked for)."""
    if params.detokenize:
        return [c.text for c in completions]
    return tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=params.skip_special_tokens)


@dataclass
class Completion:
    """One sample of a prompt."""

    token_ids: list[int]  # (T,)
    logprobs: list[float]  # (T,) each sampled token's log-prob under the distribution sampled from
    text: str
    finish_reason: str | None
    versions: list[int] | None = None  # (T,) weight version that sampled each token (in-flight engine only)


@dataclass
class Output:
    """One prompt's samples, and the prompt ids the engine actually saw."""

    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)


class Engine(Protocol):
    """What a `Generator` asks of an engine."""

    tokenizer: Any

    def sample(self, token_prompts: list[list[int]], params) -> list[Output]:
        """One `Output` per prompt, `params.n` completions each."""

    def load(self, version: int, tensors: list) -> None:
        """Apply a whole checkpoint-format state (a list of (name, tensor)) and reset the prefix cache."""

    def load_adapter(self, version: int, directory: str) -> None:
        """Serve the PEFT adapter in `directory` on the base model for every request from now on."""

    def layout(self) -> dict:
        """Where each served parameter sits in a shared-memory slot (plain CPU layout only)."""

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        """Serve the parameters from views of `slot`, without copying."""

    def loading_s(self) -> float:
        """Seconds generation has stood still for weight loads since the engine started."""

    def close(self) -> None:
        """Release what would outlive the owning process (engine processes, /dev/shm segments)."""


class SyncEngine:
    """vLLM's `LLM`, in this process; weights change only between `sample` calls."""

    lora: Any = None  # the LoRARequest every request uses (adapter sync); None: the base model alone

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int,
                 weight_transfer_backend: str | None = None, engine_kwargs: dict | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM
        from vllm.platforms import current_platform

        self.id, self.model_path, self.cpu_weight_layout = generator_id, model_path, cfg.cpu_weight_layout
        self.in_place = cfg.cpu_weight_layout == "plain" and current_platform.is_cpu()
        if current_platform.is_cpu():
            set_cpu_weight_layout("plain" if self.in_place else "packed")  # before the engine loads the model
        if weight_transfer_backend == "relay_cpu":
            import transport.cpu_engine  # noqa: F401  registers the engine with vLLM's factory before the engine is built
        self.llm = LLM(**engine_args(
            cfg, model_path, generator_id, max_model_len,
            # vLLM's weight-transfer engine API (init/start/update/finish) is only wired up when configured
            weight_transfer_config=None if weight_transfer_backend is None else {"backend": weight_transfer_backend},
            **(engine_kwargs or {})))
        self.tokenizer = self.llm.get_tokenizer()

    def sample(self, token_prompts: list[list[int]], params) -> list[Output]:
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_prompts], params, use_tqdm=False,
                                 lora_request=self.lora)
        texts = iter(response_texts(self.tokenizer, params, [c for o in outs for c in o.outputs]))
        return [Output(list(o.prompt_token_ids), [Completion(list(c.token_ids), sampled_logprobs(c.token_ids, c.logprobs),
                                                             next(texts), c.finish_reason) for c in o.outputs]) for o in outs]

    def load(self, version: int, tensors: list) -> None:
        """Plain CPU weights are copied into place; otherwise vLLM's layerwise reload re-creates and repacks
        the layers. The prefix cache is reset so no block computed under the old weights is reused."""
        if self.in_place:
            self.llm.collective_rpc(load_in_place, args=(tensors,))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def load_adapter(self, version: int, directory: str) -> None:
        """Serve the PEFT adapter in `directory` as `version` from the next `sample` on. Loaded now by an explicit
        add_lora, which raises on a bad file (a lazy load inside a generation step hangs the engine) and loads the
        new adapter before evicting any; then the previous one is removed, so memory does not grow. A fresh id and
        path per version also keep the prefix cache apart (vLLM keys cached blocks by the adapter's name and path)."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(f"v{version}", version + 1, directory, load_inplace=True)
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"generator {self.id}: vLLM did not load adapter version {version} from {directory}")
        old, self.lora = self.lora, request
        if old is not None and old.lora_int_id != request.lora_int_id:
            self.llm.llm_engine.remove_lora(old.lora_int_id)  # False if the LRU cache evicted it already

    def layout(self) -> dict:
        # read while the engine still holds the checkpoint it loaded, so the layout is checked against it
        if not self.in_place:
            raise RuntimeError(f"generator {self.id}: shared-memory weights need vLLM's plain CPU layout "
                               f"(actors.cpu_weight_layout: plain, on CPU), not {self.cpu_weight_layout!r}")
        from transport.shared_slots import read_checkpoint

        return self.llm.collective_rpc(layout_of, args=(read_checkpoint(self.model_path),))[0]

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        self.llm.collective_rpc(point_at, args=([(r["name"], slot.view(r)) for r in layout["regions"]],))
        self.llm.reset_prefix_cache()

    def loading_s(self) -> float:
        return 0.0  # weights change between requests only, never while one runs

    def close(self) -> None:
        """Nothing outlives this process: the in-process engine goes with it."""

    # vLLM's weight-transfer engine API, driven by a trainer-side transport (transport/push.py). The engine
    # named by `weight_transfer_backend` receives the data (NCCL on GPU); these only relay the control plane.
    def push_init(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def push_update(self, update_info: dict | list[dict]) -> None:
        """start, update and finish one version, then drop the prefix blocks of the old one."""
        self.llm.collective_rpc("start_weight_update")
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
