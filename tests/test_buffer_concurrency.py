"""Concurrent producers and a consumer lose and duplicate nothing: threads, then real Ray actors."""
from __future__ import annotations

import random
import threading

import pytest
import ray

from buffer import BufferConfig, ReplayBuffer, rollouts_to_arrow
from buffer.actor import make_buffer_actor
from buffer.testing import fake_batch, fake_group

pytestmark = pytest.mark.timeout(120)
GROUP_SIZE = 4


def produce(put, prefix: str, n_groups: int, seed: int) -> None:
    """Put n_groups groups in batches of 1-5 groups; every third group is sent in two parts."""
    rng = random.Random(seed)
    rows = [fake_group(f"{prefix}-{i}", group_size=GROUP_SIZE) for i in range(n_groups)]
    i = 0
    while i < n_groups:
        k = rng.randint(1, 5)
        chunk = [r for group in rows[i : i + k] for r in group]
        if i % 3 == 0:
            cut = rng.randint(1, len(chunk) - 1)
            put(rollouts_to_arrow(chunk[:cut]))
            put(rollouts_to_arrow(chunk[cut:]))
        else:
            put(rollouts_to_arrow(chunk))
        i += k


def consume(sample, n_groups: int, per_call: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n_groups * GROUP_SIZE:
        batch = sample(min(per_call, n_groups - len(ids) // GROUP_SIZE))
        assert batch is not None, f"consumer starved after {len(ids)} rollouts"
        gids = batch.column("group_id").to_pylist()
        assert all(gids.count(g) == GROUP_SIZE for g in gids), "a partial group was served"
        ids.extend(batch.column("rollout_id").to_pylist())
    return ids


def expected_ids(prefixes: list[str], n_groups: int) -> list[str]:
    return sorted(f"{p}-{i}/{k}" for p in prefixes for i in range(n_groups) for k in range(GROUP_SIZE))


def test_threads_lose_and_duplicate_nothing():
    # A small capacity and a limiter make producers block and wake many times.
    cfg = BufferConfig(capacity_groups=64, samples_per_insert=1.0, spi_tolerance=16, max_staleness=10**6)
    buf = ReplayBuffer(cfg, groups_per_step=4)
    prefixes, n_groups = [f"t{j}" for j in range(4)], 60
    threads = [
        threading.Thread(target=produce, args=(lambda b: buf.put(b, timeout=20), p, n_groups, j))
        for j, p in enumerate(prefixes)
    ]
    for t in threads:
        t.start()
    ids = consume(lambda n: buf.sample(n, 0, timeout=20), len(prefixes) * n_groups, per_call=4)
    for t in threads:
        t.join(10)
    assert sorted(ids) == expected_ids(prefixes, n_groups)
    stats = buf.stats()
    assert stats["drops_evicted_unsampled"] == 0 and stats["size_groups"] == 0 and stats["pending_rollouts"] == 0


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Producer:
    """A rollout actor stand-in: sends record batches (half of them as ObjectRefs) to the buffer actor."""

    def run(self, buffer, prefix: str, n_groups: int, seed: int) -> int:
        calls = [0]

        def put(batch):
            arg = ray.put(batch) if calls[0] % 2 else batch  # a top-level ObjectRef arrives resolved
            calls[0] += 1
            ray.get(buffer.put.remote(arg, timeout=30))

        produce(put, prefix, n_groups, seed)
        return calls[0]


def test_ray_actors_lose_and_duplicate_nothing(ray_cluster, tmp_path):
    cfg = BufferConfig(capacity_groups=64, max_staleness=10**6)
    buffer = make_buffer_actor(cfg, groups_per_step=4, run_dir=str(tmp_path), name="replay-test")
    assert ray.get_actor("replay-test") is not None
    prefixes, n_groups = [f"a{j}" for j in range(3)], 40
    producers = [Producer.remote() for _ in prefixes]
    runs = [p.run.remote(buffer, prefix, n_groups, j) for j, (p, prefix) in enumerate(zip(producers, prefixes))]
    ids = consume(lambda n: ray.get(buffer.sample.remote(n, 0, timeout=30)), len(prefixes) * n_groups, per_call=8)
    assert all(calls > 0 for calls in ray.get(runs))
    assert sorted(ids) == expected_ids(prefixes, n_groups)
    stats = ray.get(buffer.stats.remote())
    assert stats["inserts"] == stats["samples"] == len(prefixes) * n_groups
    ray.get(buffer.save.remote())  # persistence through the actor: run_dir/buffer
    ray.kill(buffer)


def test_actor_blocked_sample_does_not_block_puts(ray_cluster):
    buffer = make_buffer_actor(BufferConfig(max_staleness=10), groups_per_step=2, run_dir=None)
    waiting = buffer.sample.remote(2, 0, timeout=30)  # blocks in the actor until two groups arrive
    assert ray.get(buffer.try_admit.remote(2, 0))
    assert ray.get(buffer.put.remote(fake_batch(["x", "y"]))) == 2
    assert ray.get(waiting, timeout=30).num_rows == 2 * GROUP_SIZE
    ray.kill(buffer)


def test_a_checkpoint_first_takes_the_admission_the_buffer_already_counted(ray_cluster):
    """launch.calls.Calls.settle, which the launcher runs before each checkpoint: an admission answered but not
    yet read is handled (the buffer counted its groups, so the launcher's state must hold its request), and the
    other calls stay where they are."""
    from launch.calls import Calls

    buffer = make_buffer_actor(BufferConfig(max_staleness=0), groups_per_step=2, run_dir=None)
    calls, seen = Calls(), []
    assert ray.get(buffer.reserve.remote(2, 0)) == 0  # this step's groups
    calls.add(buffer.reserve.remote(2, 0, 1), "admit", 30, "asked at 0")  # the next step's, reserved
    calls.add(buffer.sample.remote(2, 0, 30), "learn", 60)  # blocked: no groups yet
    calls.settle("admit", 30, lambda ref, call: seen.append((ray.get(ref), call.data)))
    assert seen == [(1, "asked at 0")] and not calls.has("admit") and calls.has("learn")
    assert ray.get(buffer.stats.remote())["admitted"] == 4
    ray.kill(buffer)
