"""A stuck transfer fails within its timeout with an error naming the version, never a hang."""
from __future__ import annotations

import time

import pytest

from transport.base import WeightHandle
from transport.disk import DiskTransport
from transport.object_store import ObjectStoreTransport


def test_disk_fetch_of_a_file_that_never_appears(tmp_path):
    transport = DiskTransport(str(tmp_path))
    handle = WeightHandle(9, "disk", str(tmp_path / "weights-v00000009.safetensors"), 0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="weights version 9: .*did not appear within 0.5s"):
        list(transport.fetch(handle, timeout_s=0.5))
    assert 0.5 <= time.monotonic() - t0 < 0.5 + 1.0


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_object_store_fetch_of_a_ref_that_never_resolves(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def never_finishes():
        time.sleep(3600)

    ref = never_finishes.remote()
    handle = WeightHandle(5, "object_store", ref, 0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="weights version 5: object store get exceeded 1.0s"):
        list(ObjectStoreTransport().fetch(handle, timeout_s=1.0))
    assert 1.0 <= time.monotonic() - t0 < 1.0 + 2.0
    ray.cancel(ref, force=True)


class _Generator:
    """A generator's weight-transfer surface, as a Ray actor: answers, hangs, or fails."""

    def __init__(self, mode: str):
        self.mode = mode

    def apply_weight_update(self, update_info, version):
        if self.mode == "stuck":
            time.sleep(3600)
        if self.mode == "fails":
            raise ValueError("engine refused")


@pytest.mark.slow
def test_push_rpc_to_stuck_dead_or_failing_actors_is_named(ray_local):
    """The push transports' client over real Ray actors: every call has a deadline and names the generator."""
    from transport.push import TimedClient

    ray = ray_local
    cls = ray.remote(num_cpus=0)(_Generator)
    ok, stuck, fails, dead = cls.remote("ok"), cls.remote("stuck"), cls.remote("fails"), cls.remote("ok")
    ray.kill(dead)
    ray.get(ok.apply_weight_update.remote({}, "0"), timeout=120)  # started: only the stuck one may miss the deadline

    client = TimedClient({"gen-0": ok, "gen-1": stuck}, timeout_s=1.0)
    client.version = 4
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"weights version 4: apply_weight_update did not return within 1.0s on generator\(s\) gen-1$"):
        client.update_weights({"buckets": []})
    assert time.monotonic() - t0 < 1.0 + 2.0
    for peers, match in (({"gen-2": fails}, "(?s)failed on generator gen-2: .*engine refused"),
                         ({"gen-3": dead}, "(?s)failed on generator gen-3: .*(died|dead|killed)")):
        client = TimedClient({"gen-0": ok, **peers}, timeout_s=30.0)
        client.version = 4
        with pytest.raises(RuntimeError, match=match):
            client.update_weights({"buckets": []})
    ray.kill(stuck)
