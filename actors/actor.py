"""The rollout actor: a thin Ray shell around `Generator` that also talks to the weight transport; `start_request`
sends a request to it and its rows on to the buffer."""
from __future__ import annotations

import os
import threading
import time

import ray

from actors.config import ActorConfig
from actors.engines import actor_seed
from actors.generator import Generator, Prompt
from buffer.schema import RequestRows
from common.heap import freeze_heap_once, set_young_threshold
from common.seeding import seed_everything
from transport.base import WeightHandle, WeightTransport


# A request of the default job made 5.6 young collections (~0.3 ms, 1% of the request) that freed nothing: over
# 200 requests they collected 0 objects, since what a request builds dies by reference counting. At 20,000 none ran
# in 200 requests and peak memory did not change (timed by a gc.callbacks hook around Generator.generate).
YOUNG_GC_THRESHOLD = 20_000


class RolloutActor:
    """Owns one vLLM engine. Between requests (its safe point) it applies the newest weights it was handed;
    with `weight_update_mode: in_flight` also during a request, when `offer_weights` is called (on a second
    thread of this actor) while `generate` runs."""

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int,
                 transport: WeightTransport | None, fetch_timeout_s: float, version: int = 0,
                 weight_transfer_backend: str | None = None, adapter_rank: int | None = None,
                 initial_adapter: str | None = None, judges=None, local_judges: dict | None = None):
        """`adapter_rank`: versions arrive as LoRA adapters of up to that rank (learner.lora.sync adapter), served on
        the base model `model_path`; `initial_adapter`: the PEFT directory of `version` (a resumed run's checkpoint).
        `judges`: the judge service that scores model:<name> rewards (`local_judges`: judges loaded here instead)."""
        # Python/NumPy/torch draws here (user reward code, tie-breaking) follow the run's seed, distinct per actor
        # like the engine's own sampling seed (actors/engines.py)
        seed_everything(actor_seed(cfg, generator_id))
        # the engine follows cfg.weight_update_mode: synchronous (push transports allowed), or async for in_flight
        self.gen = Generator(cfg, model_path, generator_id, max_model_len, version, weight_transfer_backend,
                             adapter_rank=adapter_rank)
        if initial_adapter is not None:
            self.gen.load_adapter_dir(version, initial_adapter)
        self.transport, self.fetch_timeout_s = transport, fetch_timeout_s
        attach_judges(self.gen, judges, local_judges, fetch_timeout_s)
        self._sync_lock = threading.Lock()  # in_flight: generate's sync and offer_weights run on two threads
        set_young_threshold(YOUNG_GC_THRESHOLD)
        if transport is not None:
            transport.attach(self.gen)

    def sync(self, handle: WeightHandle | None) -> float:
        """Apply `handle` if it is newer than what this engine serves; intermediate versions are simply never fetched."""
        with self._sync_lock:  # the version check and the load as one step, so versions only move forward
            if handle is None or handle.version <= self.gen.version:
                return 0.0
            t0 = time.perf_counter()
            self.transport.apply(handle, self.gen, self.fetch_timeout_s)
            return time.perf_counter() - t0

    def offer_weights(self, handle: WeightHandle) -> float:
        """A newly published version, applied now: in_flight actors run this on a second thread, also in the
        middle of a running `generate` (tokens sampled after the swap record `handle.version`). Returns the
        seconds spent. Between batches the launcher hands the newest version over with each request instead."""
        return self.sync(handle)

    @ray.method(num_returns=2)
    def generate(self, prompts: list[Prompt], handle: WeightHandle | None) -> tuple[bytes, bytes]:
        """Sample and score one request: (its summary, its rows), each as bytes (`GenerationResult.of` and
        `RequestRows.of` read them; common/wire.py says why). Two return values, so the caller can hand the rows
        on to be stored before they exist (`start_request`) and read the summary alone; this actor submits no call
        of its own and goes straight on to its next request."""
        load_s = self.sync(handle)
        result = self.gen.generate(prompts)
        result.load_s += load_s  # plus, in_flight, the time generation stood paused for swaps during the request
        rows = RequestRows(result.batch, result.skipped, result.judge_work)
        result.batch, result.judge_work = None, []  # the rows go on; only the summary returns to the launcher
        freeze_heap_once()  # after the first request: what it built lives as long as the actor
        return result.to_bytes(), rows.to_bytes()

    def evaluate(self, prompts: list[Prompt], handle: WeightHandle | None) -> dict[str, float]:
        self.sync(handle)
        return {**self.gen.evaluate(prompts), "eval/policy_version": self.gen.version}

    def version(self) -> int:
        """The version this engine serves (the benchmarks check that a sync landed)."""
        return self.gen.version

    def close(self) -> None:
        """Stop an in_flight engine's process before the actor is killed (it would leave /dev/shm segments)."""
        self.gen.close()

    # Push transports: the learner's rank 0 drives these through vLLM's weight-transfer engine API. A single-threaded
    # actor runs one atomic update between two requests, never inside one.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.gen.init_weight_transfer_engine(init_info)

    def apply_weight_update(self, update_info: dict | list[dict], weight_version: str) -> None:
        self.gen.apply_weight_update(update_info, weight_version)

    def pid(self) -> int:
        """The worker process id (operators and fault-injection tests kill it from outside)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()


def start_request(actor, sink, prompts: list[Prompt], handle: WeightHandle | None, request_id: str):
    """One request on rollout `actor`: (the ObjectRef of its summary, `GenerationResult.of(ray.get(it))`, and the
    ObjectRef of `sink`'s answer for its rows). The put is submitted now with the actor's second return value as its
    argument, before that exists: Ray sends the rows from the actor to `sink` (the buffer, or the judge service,
    which scores and then stores them) without the caller deserializing them. So the actor submits nothing itself
    (that submission, and an ObjectRef inside its answer, cost it ~0.6 ms a request: benchmarks.rollout), and the
    acknowledgement belongs to the caller: it still arrives when the actor dies after returning. The put carries
    `request_id`, so the sink refuses a second copy of a request re-issued after its actor was taken for dead."""
    summary, rows = actor.generate.remote(prompts, handle)
    return summary, sink.put_rows.remote(rows, request_id)


def attach_judges(gen: Generator, service, local: dict | None, timeout_s: float) -> None:
    """How `model:<name>` rewards are scored in this actor: handed to the judge `service` unscored (generation goes on
    at once) and, for evaluation, scored there while this actor waits; or, with `local` judges ({name: (config,
    path)}, loaded here), inline in this actor (benchmarks.reward_offload's baseline)."""
    if local:
        from actors.judge import Judge

        held = {name: Judge(cfg, name, path) for name, (cfg, path) in local.items()}
        gen.rewards.judge = lambda name, groups: held[name].score_groups(groups)
    elif service is not None:
        gen.defer_judges = True
        gen.rewards.judge = lambda name, groups: ray.get(service.score.remote(name, groups), timeout=timeout_s)


def rollout_bundles(cfg: ActorConfig) -> list[dict]:
    """A tensor-parallel actor's placement group: one whole GPU per tensor-parallel worker (vLLM accepts no more
    than one GPU per bundle), the first bundle also holding the actor's own CPUs."""
    return [{"GPU": 1.0, "CPU": cfg.num_cpus, **cfg.resources}] + [{"GPU": 1.0}] * (cfg.tensor_parallel_size - 1)


def place_rollout_actor(cfg: ActorConfig):
    """A fresh placement group for one rollout actor, or None with one GPU or none (each actor then simply
    requests actors.num_cpus/num_gpus, as always). STRICT_PACK: tensor-parallel workers talk over NVLink/PCIe on
    one node. Not waited for: the actor's start-up call waits (ray.startup_timeout_s), so a group that cannot be
    placed yet fails that actor like any other start-up failure. The fleet removes it with the actor."""
    if cfg.tensor_parallel_size == 1:
        return None
    from ray.util.placement_group import placement_group

    return placement_group(rollout_bundles(cfg), strategy="STRICT_PACK")


def rollout_actor_options(cfg: ActorConfig, placement=None) -> dict:
    """Ray options of a rollout actor. In a placement group the actor takes only CPUs, in bundle 0; vLLM's Ray
    executor finds the group (capture_child_tasks makes it the actor's current group) and starts one worker per
    GPU bundle, and a worker is a child of this actor, so it dies with it."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
           "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "TOKENIZERS_PARALLELISM": "false"}
    options = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources, name=None, max_restarts=0,
                   runtime_env={"env_vars": env},
                   # in_flight: offer_weights (and evaluate) must run while generate blocks, so the actor is threaded
                   max_concurrency=4 if cfg.weight_update_mode == "in_flight" else 1)
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=placement, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
    return options


def make_rollout_actor(cfg: ActorConfig, generator: int | str, placement=None, **kwargs):
    """Each actor requests its own resources (a tensor-parallel one, its own placement group), so an autoscaler can
    add nodes for rollouts alone."""
    cls = ray.remote(RolloutActor).options(**rollout_actor_options(cfg, placement))
    generator_id = f"gen-{generator}" if isinstance(generator, int) else generator  # an index or a full id
    return cls.remote(cfg, generator_id=generator_id, **kwargs)
