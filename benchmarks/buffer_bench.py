"""ReplayBufferActor vs ray.util.queue.Queue: groups/s moved from a producer actor to the learner.

Both paths move the same records (groups of 8 generations x 512 response tokens, Arrow record
batches built once before timing) from one producer actor to a consumer in the driver, with the
same memory bound (capacity 256 groups / Queue maxsize 256). The queue is used the way OpenRLHF
uses it: one put and one get per item (item = one group's record batch). The buffer path sends
one record batch of `batch_groups` groups per put and receives one concatenated batch per sample.
The ratio is therefore mostly the cost of per-item remote calls that batching removes; each sample
also reports the buffer called with one group per put/sample, to show that part.

    .venv/bin/python -m benchmarks.buffer_bench [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pyarrow as pa
import ray
from ray.util.queue import Queue

from buffer.actor import make_buffer_actor
from buffer.config import BufferConfig
from buffer.testing import fake_group_fast

GROUP_SIZE, RESPONSE_LEN, CAPACITY = 8, 512, 256
IN_FLIGHT = 2  # calls each side keeps outstanding on the buffer path


@ray.remote(num_cpus=0)
class Producer:
    """Holds the groups ready-made so only the transfer is timed."""

    def __init__(self, n_groups: int) -> None:
        self.groups = [fake_group_fast(f"g{i}", GROUP_SIZE, RESPONSE_LEN) for i in range(n_groups)]

    def to_buffer(self, buffer, batch_groups: int, in_flight: int) -> None:
        pending = []
        for i in range(0, len(self.groups), batch_groups):
            if len(pending) >= in_flight:  # a bounded window of puts: overlap transfer with the buffer's work
                ray.get(pending.pop(0))
            pending.append(buffer.put.remote(pa.concat_batches(self.groups[i : i + batch_groups]), timeout=120))
        ray.get(pending)

    def to_queue(self, queue: Queue) -> None:
        for group in self.groups:
            queue.put(group, timeout=120)


def time_buffer(producer, n_groups: int, batch_groups: int) -> float:
    # Backpressure like the queue's maxsize: the limiter keeps held groups <= min_size + tolerance + one put,
    # which stays within capacity, so nothing is evicted.
    tolerance = (CAPACITY - 2 * batch_groups) / 2
    cfg = BufferConfig(capacity_groups=CAPACITY, staleness_policy="drop", max_staleness=10**9,
                       samples_per_insert=1.0, spi_tolerance=tolerance, min_size_groups=batch_groups)
    buffer = make_buffer_actor(cfg, groups_per_step=batch_groups, run_dir=None)
    ray.get(buffer.stats.remote())  # actor started before timing
    t0 = time.perf_counter()
    done = producer.to_buffer.remote(buffer, batch_groups, IN_FLIGHT)
    n_calls = n_groups // batch_groups
    pending = [buffer.sample.remote(batch_groups, 0, timeout=120) for _ in range(min(IN_FLIGHT, n_calls))]
    received, issued = 0, len(pending)
    while pending:
        received += ray.get(pending.pop(0)).num_rows // GROUP_SIZE
        if issued < n_calls:  # the learner prefetches its next batch while it "trains" on this one
            pending.append(buffer.sample.remote(batch_groups, 0, timeout=120))
            issued += 1
    assert received == n_groups
    elapsed = time.perf_counter() - t0
    ray.get(done)
    assert ray.get(buffer.stats.remote())["drops_evicted_unsampled"] == 0
    ray.kill(buffer)
    return n_groups / elapsed


def time_queue(producer, n_groups: int) -> float:
    queue = Queue(maxsize=CAPACITY)
    queue.size()  # actor started before timing
    t0 = time.perf_counter()
    done = producer.to_queue.remote(queue)
    received = sum(queue.get(timeout=120).num_rows // GROUP_SIZE for _ in range(n_groups))
    elapsed = time.perf_counter() - t0
    ray.get(done)
    queue.shutdown()
    assert received == n_groups
    return n_groups / elapsed


def run(quick: bool) -> dict:
    """Both throughputs over >= 3 interleaved repeats; value/baseline are medians."""
    n_groups, repeats, batch_groups = (256, 3, 32) if quick else (1024, 5, 64)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        producer = Producer.remote(n_groups)
        samples = []
        for _ in range(repeats):
            samples.append({
                "buffer": time_buffer(producer, n_groups, batch_groups),
                "queue": time_queue(producer, n_groups),
                # Context, not the target: the buffer called once per group, like the queue.
                "buffer_one_group_per_call": time_buffer(producer, n_groups, 1),
            })
    finally:
        if started_here:
            ray.shutdown()
    value = statistics.median(s["buffer"] for s in samples)
    baseline = statistics.median(s["queue"] for s in samples)
    return {
        "name": "buffer_vs_ray_queue",
        "value": round(value, 1),
        "baseline": round(baseline, 1),
        "ratio": round(value / baseline, 2),
        "unit": "groups/s",
        "target": 5.0,
        "samples": [{k: round(v, 1) for k, v in s.items()} for s in samples],
        "config": {"n_groups": n_groups, "batch_groups": batch_groups, "group_size": GROUP_SIZE,
                   "response_len": RESPONSE_LEN, "capacity_groups": CAPACITY},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer groups and repeats")
    print(json.dumps(run(parser.parse_args().quick)))
