"""Tensor-parallel rollout actors on fake GPUs: each actor reserves its own placement group of {GPU: 1} bundles, the
GPU workers it starts land in it, and replacement and scaling free and reserve whole groups.

No vLLM engine starts here (a CPU machine cannot run vLLM's GPU workers): a stand-in actor, started with the
rollout actor's own Ray options, does what vLLM's Ray executor does in it -- one `num_gpus=1` worker per GPU bundle
of its current placement group. The GPU path of vLLM itself is not exercised."""
from __future__ import annotations

import os
import time

import pytest

from actors.actor import place_rollout_actor, rollout_actor_options, rollout_bundles
from actors.config import ActorConfig

pytestmark = pytest.mark.slow

TP2 = ActorConfig(num_gpus=1, tensor_parallel_size=2, num_cpus=0.25)


@pytest.fixture(scope="module")
def ray4():
    import ray

    # our own cluster, never a running one: 4 GPUs Ray believes in, none of them real
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class GpuWorker:
    def gpu_ids(self) -> list:
        import ray

        return ray.get_gpu_ids()


class StandInRolloutActor:
    """The rollout actor's Ray shape: `pid` and `close` as the fleet calls them, and vLLM's executor start-up."""

    def __init__(self, generator_id: str):
        self.generator_id, self.workers = generator_id, []

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        pass

    def placement_id(self) -> str | None:
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()  # what vLLM's EngineArgs reads inside a Ray actor
        return pg.id.hex() if pg else None

    def start_workers(self) -> list:
        """As vLLM's RayExecutorV2: one num_cpus=0, num_gpus=1 worker in each GPU bundle of the current group."""
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        gpu_bundles = [i for i, b in enumerate(pg.bundle_specs) if b.get("GPU", 0)]
        self.workers = [ray.remote(GpuWorker).options(num_cpus=0, num_gpus=1, scheduling_strategy=
                        PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)).remote()
                        for i in gpu_bundles]
        return [g for w in ray.get([w.gpu_ids.remote() for w in self.workers], timeout=30) for g in w]


def _fleet(ray, cfg: ActorConfig):
    from launch.fleet import RolloutFleet

    def make(generator_id, placement):
        return ray.remote(StandInRolloutActor).options(**rollout_actor_options(cfg, placement)).remote(generator_id)

    return RolloutFleet(make, max_failures=3, place=lambda: place_rollout_actor(cfg))


def _ready(ray, fleet, timeout_s: float = 60) -> None:
    for ref, index in fleet.starting_refs().items():
        ray.wait([ref], timeout=timeout_s)
        fleet.on_ready(index)


def _state(pg) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(pg)["state"]


def _wait_gpus(ray, expected: float, timeout_s: float = 20) -> float:
    deadline = time.monotonic() + timeout_s
    while (gpus := ray.available_resources().get("GPU", 0.0)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return gpus


def test_one_gpu_actors_keep_their_plain_resources():
    """tp=1: no placement group, the same options as before tensor parallelism existed."""
    cfg = ActorConfig(num_gpus=0.5, num_cpus=2)
    assert place_rollout_actor(cfg) is None
    options = rollout_actor_options(cfg)
    assert options["num_gpus"] == 0.5 and options["num_cpus"] == 2 and "scheduling_strategy" not in options
    assert rollout_bundles(TP2) == [{"GPU": 1.0, "CPU": 0.25}, {"GPU": 1.0}]


def test_tensor_parallel_actors_reserve_free_and_replace_whole_groups(ray4):
    from ray.util.placement_group import placement_group_table

    fleet = _fleet(ray4, TP2)
    fleet.scale_to(2)
    _ready(ray4, fleet)
    assert sorted(s.state for s in fleet.slots.values()) == ["idle", "idle"]
    gpus = []
    for slot in fleet.slots.values():
        table = placement_group_table(slot.placement)
        assert table["state"] == "CREATED" and table["strategy"] == "STRICT_PACK"
        assert [b for _, b in sorted(table["bundles"].items())] == [{"GPU": 1.0, "CPU": 0.25}, {"GPU": 1.0}]
        assert ray4.get(slot.actor.placement_id.remote()) == slot.placement.id.hex()  # vLLM would find it
        gpus.append(ray4.get(slot.actor.start_workers.remote(), timeout=60))
    assert all(len(g) == 2 for g in gpus) and len({g for pair in gpus for g in pair}) == 4  # 2 GPUs each, no sharing
    assert _wait_gpus(ray4, 0.0) == 0.0

    # a dead actor: its group goes with it, the replacement reserves a fresh one and its workers get GPUs again
    old = fleet.slots[0].placement
    fleet.on_failure(0, RuntimeError("engine died"))
    assert _state(old) == "REMOVED"
    new = fleet.slots[0]
    assert new.generator_id == "gen-0.r1" and new.placement is not None and new.placement.id != old.id
    _ready(ray4, fleet)
    assert fleet.slots[0].state == "idle" and len(ray4.get(new.actor.start_workers.remote(), timeout=60)) == 2

    # launch.scale down: the retired actor's two GPUs are free again
    retired = fleet.slots[1].placement
    fleet.scale_to(1)
    assert _state(retired) == "REMOVED" and list(fleet.slots) == [0]
    assert _wait_gpus(ray4, 2.0) == 2.0

    # scale up past the cluster: one more group fits, the next waits unplaced (its actor's start-up call times
    # out in a real run, and the launcher replaces it) -- it never takes a GPU from a placed one
    fleet.scale_to(3)
    added = [fleet.slots[i] for i in sorted(fleet.slots) if i != 0]
    time.sleep(2)
    assert sorted(_state(s.placement) for s in added) == ["CREATED", "PENDING"]
    groups = [s.placement for s in fleet.slots.values()]
    fleet.close_all(timeout_s=10)
    assert [_state(pg) for pg in groups] == ["REMOVED"] * 3 and not fleet.slots
    assert _wait_gpus(ray4, 4.0) == 4.0
