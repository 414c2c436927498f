"""The Ray shell around ReplayBuffer: no logic here, only how it is launched.

Threaded concurrency lets a sample that waits for data, a generator waiting for admission and a
put blocked by the limiter all wait in Condition.wait at once while other calls proceed; every
waiting call holds one of the max_concurrency threads, hence the generous default.
Producers should send one record batch per call (or an ObjectRef of one, which Ray resolves
zero-copy from the object store) rather than one call per rollout.
"""
from __future__ import annotations

import ray

from buffer.config import BufferConfig
from buffer.replay import ReplayBuffer

ReplayBufferActor = ray.remote(ReplayBuffer)


def make_buffer_actor(
    cfg: BufferConfig,
    groups_per_step: int,
    run_dir: str | None,
    name: str | None = None,
    num_cpus: float = 0,
    max_concurrency: int = 16,
    offline_per_step: int = 0,
) -> ray.actor.ActorHandle:
    """Start the buffer actor; name it to let other processes find it with ray.get_actor(name)."""
    if max_concurrency < 4:
        raise ValueError(
            f"buffer actor needs max_concurrency >= 4 so blocked calls do not starve the rest, got {max_concurrency}"
        )
    # On the driver's node: the buffer persists into the run directory the driver reads, and a worker node that
    # leaves the cluster (a spot node, scale-down) must not take every stored rollout with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": num_cpus, "max_concurrency": max_concurrency, "scheduling_strategy": here}
    if name is not None:
        options["name"] = name
    return ReplayBufferActor.options(**options).remote(cfg, groups_per_step, run_dir, offline_per_step)
