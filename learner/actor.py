"""Learner ranks as Ray actors: thin shells that set the distributed environment and hold a `Learner`."""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import ray

from common.heap import freeze_heap_once
from learner.batch import source_metrics
from learner.config import LearnerConfig
from learner.learner import Learner


class LearnerRank:
    def __init__(self, cfg: LearnerConfig, model_path: str, group_size: int, temperature: float, rank: int,
                 world_size: int, master_addr: str, master_port: int, transport):
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.learner = Learner(cfg, model_path, group_size, temperature, rank, world_size)
        self.transport = transport
        self._reading: dict[int, Callable[[], Any]] = {}  # deferred copies awaiting `materialize`
        self._publish_ids = itertools.count(1)  # next() is atomic: two publishes on two actor threads never share one

    def _publish(self):
        """Publish the current weights; returns (handle on rank 0, seconds the learner was blocked).

        Deferred transports (the object store, shared-memory slots) copy nothing on the learner's thread: they
        hand the copy to `_defer`, which runs it as this actor's own `materialize` call on its second thread,
        reading the live parameters, and makes the learner's next optimizer update wait for it
        (`Learner.hold_weights`) — normally long done by then, after that step's forward and backward. The
        returned handle already holds the call's ObjectRef, which a generator waits on. (Under ZeRO-3
        `full_state` is a gathered copy, so the hold costs nothing.)"""
        return self.learner.publish(self.transport, defer=self._defer)

    def _defer(self, copy) -> ray.ObjectRef:
        """Run `copy()` later as `materialize` on this actor's second thread; returns that call's ObjectRef. Each
        publish has its own key in `_reading`, so two publishes in a row never hand one `materialize` the
        other's weights."""
        key = next(self._publish_ids)
        self._reading[key] = copy
        ref = ray.get_runtime_context().current_actor.materialize.remote(key)
        self.learner.hold_weights(lambda: ray.wait([ref], timeout=None))
        return ref

    def materialize(self, key: int):
        """Runs on a second actor thread: the transport's copy of one publish (the object store: arrays viewing
        the weights, which Ray copies into the store as this call's result; shared memory: into a slot,
        returning where)."""
        return self._reading.pop(key)()

    def train_step(self, batch, publish: bool):
        """Train on `batch` (resolved by Ray from the buffer's sample); publish afterwards if asked."""
        if batch is None:
            return None
        metrics = self.learner.train_step(batch)
        freeze_heap_once()  # after the first step: the optimizer's state and first-use imports exist now
        handle, publish_s = self._publish() if publish else (None, 0.0)
        metrics["weight_sync_s"] = publish_s
        # Every rank receives the whole batch; rank 0 reports its groups for the run's exactly-once ledger.
        group_ids = batch.column("group_id").unique().to_pylist() if self.learner.rank == 0 else []
        if self.learner.rank == 0:  # over the whole batch, after the ranks' all-reduce (their sources differ)
            metrics.update(source_metrics(batch))
        mismatch = self.learner.mismatch if self.learner.rank == 0 else {}  # per generator (learner/mismatch.py)
        return {"metrics": metrics, "handle": handle, "step": self.learner.step, "group_ids": group_ids,
                "mismatch": mismatch}

    def save_pretrained(self, out_dir: str, merge: bool | None = None):
        return self.learner.save_pretrained(out_dir, merge)

    def connect_generators(self, transport: str, bucket_mb: float, timeout_s: float, generators: dict,
                           workers_per_generator: int = 1) -> None:
        """Push transports: rank 0 builds the trainer side here (NCCL needs this process's GPU, the driver may have
        none) and joins `generators` ({generator_id: rollout actor}, each engine `workers_per_generator` workers:
        its tensor-parallel size) within `timeout_s`; other ranks publish nothing."""
        if self.learner.rank != 0:
            return
        from transport.registry import make_transport

        self.transport = make_transport(transport, "", bucket_mb, timeout_s, ray.util.get_node_ip_address(), free_port())
        self.transport.connect(generators, workers_per_generator)

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> int:
        return self.learner.load_checkpoint(directory)

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def learner_threads(cfg: LearnerConfig) -> int:
    """OpenMP threads of a learner rank: learner.num_threads, else what Ray gives an actor of num_cpus CPUs."""
    return cfg.num_threads or max(int(cfg.num_cpus), 1)


def learner_bundles(cfg: LearnerConfig) -> list[dict]:
    """One Ray bundle per rank: what that rank's actor reserves."""
    bundle = {"CPU": cfg.num_cpus} | ({"GPU": cfg.num_gpus} if cfg.num_gpus > 0 else {}) | cfg.resources
    return [dict(bundle) for _ in range(cfg.num_ranks)]


def _schedulable(resources: dict) -> dict:
    """CPU, GPU and custom resources; Ray's per-node markers and memory byte counts would drown them."""
    return {k: round(v, 2) for k, v in sorted(resources.items())
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")}


def place_learner_group(cfg: LearnerConfig):
    """Reserve every rank's bundle at once, before any rank starts: a half-placed learner would hang in the
    rendezvous. Returns (placement group, rank 0's node IP for MASTER_ADDR)."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    bundles = learner_bundles(cfg)
    pg = placement_group(bundles, strategy=cfg.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)  # a pending group would grab the resources later and starve the rest of the run
        raise RuntimeError(
            f"learner placement group ({cfg.num_ranks} bundle(s) {bundles[0]}, strategy {cfg.placement_strategy}) could not "
            f"be placed within learner.placement_timeout_s={cfg.placement_timeout_s}s; the cluster has "
            f"{_schedulable(ray.available_resources())} available of {_schedulable(ray.cluster_resources())} in total "
            f"(lower learner.num_ranks/num_cpus/num_gpus, or add nodes)")
    node_id = placement_group_table(pg).get("bundles_to_node_id", {}).get(0)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    return pg, ips.get(node_id) or ray.util.get_node_ip_address()  # the driver's IP if Ray does not say


# A port the OS picks (bind to port 0) comes from its ephemeral range, the same range every outgoing connection
# takes its source port from: on a busy Ray node one can take it between the pick and rank 0's bind (EADDRINUSE,
# seen once in CI). Below that range and above Ray's worker ports (`ray start --min/max-worker-port`, 10002-19999),
# a port is only ever taken by a process that asks for it by number.
RENDEZVOUS_PORTS = (20000, 32767)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now in RENDEZVOUS_PORTS (below the ephemeral range), or, if none of 64 tries is, one the OS
    picks. Drawn from the system's entropy: runs started with one seed must not all try the same ports."""
    import random
    import socket

    low, high = RENDEZVOUS_PORTS[0], min(RENDEZVOUS_PORTS[1], _ephemeral_low() - 1)
    candidates = random.SystemRandom().sample(range(low, high + 1), min(64, high + 1 - low)) if high >= low else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port for the learner's rendezvous")


def rendezvous_port(pg, master_addr: str, timeout_s: float) -> int:
    """A free port on rank 0's node: picked here when that node is the driver's, else by a CPU-less task that
    Ray runs in bundle 0 (a port free on the driver says nothing about another machine)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if master_addr == ray.util.get_node_ip_address():
        return free_port()
    probe = ray.remote(num_cpus=0)(free_port).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
    return ray.get(probe.remote(), timeout=timeout_s)


def make_learner_ranks(cfg: LearnerConfig, **kwargs) -> list:
    """One actor per rank, rank r in bundle r of the learner's placement group; rank 0's node is the rendezvous
    point for the process group. Rollout actors stay outside the group: they scale on their own."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg, addr = place_learner_group(cfg)
    port = rendezvous_port(pg, addr, cfg.placement_timeout_s)
    cls = ray.remote(LearnerRank).options
    env = {"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(learner_threads(cfg))}}}
    return [
        # max_concurrency 2: `materialize` (object-store publishing) runs while the next step trains
        cls(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources, max_restarts=0, max_concurrency=2, **env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)).remote(
            cfg, rank=r, world_size=cfg.num_ranks, master_addr=addr, master_port=port, **kwargs)
        for r in range(cfg.num_ranks)
    ]
