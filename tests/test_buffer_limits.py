"""Staleness admission, synchronous mode, and the samples-per-insert limiter, with real threads."""
from __future__ import annotations

import threading
import time

import pytest

from buffer import BufferConfig, ReplayBuffer
from buffer.testing import fake_batch

pytestmark = pytest.mark.timeout(60)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_admission_formula_and_release():
    buf = ReplayBuffer(BufferConfig(max_staleness=1), groups_per_step=2)
    assert buf.try_admit(4, 0)  # (0 + 1 + 1) * 2
    assert not buf.try_admit(1, 0)
    buf.release(2)
    assert buf.try_admit(2, 0) and not buf.try_admit(1, 0)
    assert buf.try_admit(2, 1) and not buf.try_admit(1, 1)  # the learner's step, carried by the call
    assert not buf.try_admit(1, 0)  # an older step never shrinks what the buffer knows
    assert buf.stats()["admitted"] == 6 and buf.stats()["learner_version"] == 1


def test_producer_is_refused_until_the_learner_advances():
    buf = ReplayBuffer(BufferConfig(max_staleness=1), groups_per_step=2)
    admitted = [i for i in range(6) if buf.try_admit(1, 0)]
    assert len(admitted) == 4  # the rest would run 2 versions ahead
    assert buf.try_admit(1, 1) and buf.try_admit(1, 1) and not buf.try_admit(1, 1)


def test_sync_mode_alternates_generation_and_training():
    buf = ReplayBuffer(BufferConfig(max_staleness=0), groups_per_step=2)
    events: list[str] = []
    version = [0]
    steps = 5

    def generator():
        for step in range(steps):
            while not buf.try_admit(2, version[0]):  # the launcher retries after each learner step
                time.sleep(0.002)
            events.append(f"G{version[0]}")  # before put: the learner cannot train on it before this
            buf.put(fake_batch([f"s{step}a", f"s{step}b"], policy_version=version[0]))

    thread = threading.Thread(target=generator)
    thread.start()
    for step in range(steps):
        batch = buf.sample(2, step, timeout=10)
        assert set(batch.column("policy_version").to_pylist()) == {step}  # on-policy
        events.append(f"T{step}")
        version[0] = step + 1
    thread.join(5)
    assert events == [e for step in range(steps) for e in (f"G{step}", f"T{step}")]
    assert buf.stats()["staleness_hist_0"] == 2 * steps


def test_a_reservation_one_step_ahead_keeps_the_bound_and_does_not_move_the_clock():
    buf = ReplayBuffer(BufferConfig(max_staleness=0), groups_per_step=2)
    assert buf.reserve(2, 0, ahead=1) == 0  # fits now: no waiting
    assert buf.reserve(2, 0, ahead=0) is None  # this step's window is full...
    assert buf.reserve(2, 0, ahead=1) == 1  # ...the next step's is not: start once the learner is at 1
    assert buf.reserve(1, 0, ahead=1) is None  # and no further than `ahead`
    assert buf.stats()["reserved_ahead"] == 2 and buf.stats()["admitted"] == 4
    # the reservation is not a step: groups of version 0 are still fresh for the learner at 0
    buf.put(fake_batch(["a", "b"], policy_version=0))
    assert buf.stats()["drops_stale_at_put"] == 0 and buf.stats()["learner_version"] == 0
    assert buf.sample(2, 0, timeout=1).num_rows == 2 * len(fake_batch(["x"]))
    with pytest.raises(ValueError, match="ahead"):
        buf.reserve(1, 1, ahead=-1)


def test_stale_drop_gives_admission_slot_back():
    buf = ReplayBuffer(BufferConfig(max_staleness=0), groups_per_step=1)
    assert buf.try_admit(1, 0)
    assert buf.try_admit(1, 1) and not buf.try_admit(1, 1)
    buf.put(fake_batch(["late"], policy_version=0))  # stale on arrival: dropped, its slot returned
    assert buf.stats()["drops_stale_at_put"] == 1
    assert buf.try_admit(1, 1)


def test_put_blocks_on_limiter_and_times_out_naming_the_side():
    cfg = BufferConfig(samples_per_insert=1.0, spi_tolerance=1.0, min_size_groups=1, max_staleness=100)
    buf = ReplayBuffer(cfg, groups_per_step=1)
    buf.put(fake_batch(["a"]))
    buf.put(fake_batch(["b"]))
    with pytest.raises(TimeoutError, match="insert side"):
        buf.put(fake_batch(["c"]), timeout=0.1)
    assert buf.sample(1, 0, timeout=1) is not None
    assert buf.put(fake_batch(["c"]), timeout=1) == 1
    assert buf.stats()["blocked_s_insert"] >= 0.09


def test_sample_blocks_on_min_size_and_returns_none_on_timeout():
    buf = ReplayBuffer(BufferConfig(min_size_groups=3, max_staleness=100), groups_per_step=1)
    buf.put(fake_batch(["a", "b"]))
    assert buf.sample(1, 0, timeout=0.05) is None
    buf.put(fake_batch(["c"]))
    assert buf.sample(1, 0, timeout=1) is not None
    assert buf.stats()["blocked_s_sample"] >= 0.04


@pytest.mark.parametrize("spi", [0.5, 1.0, 2.0])
def test_limiter_holds_the_ratio_within_tolerance(spi):
    cfg = BufferConfig(samples_per_insert=spi, spi_tolerance=3.0, min_size_groups=2, max_reuse=4, max_staleness=10**6)
    buf = ReplayBuffer(cfg, groups_per_step=1)
    offset = spi * cfg.min_size_groups
    n_insert = 120

    def producer():
        for i in range(n_insert):
            buf.put(fake_batch([f"g{i}"], group_size=2), timeout=10)

    thread = threading.Thread(target=producer)
    thread.start()
    samples = 0
    while samples < int(n_insert * spi) - 4:
        assert buf.sample(1, 0, timeout=10) is not None
        samples += 1
        stats = buf.stats()
        diff = stats["inserts"] * spi - stats["samples"]
        if stats["inserts"] >= cfg.min_size_groups:
            assert offset - cfg.spi_tolerance <= diff <= offset + cfg.spi_tolerance
    thread.join(10)
    stats = buf.stats()
    assert stats["inserts"] == n_insert
    assert stats["samples"] / stats["inserts"] == pytest.approx(spi, abs=0.1)
