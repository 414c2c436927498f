"""A stuck transfer fails within its timeout with an error naming the version, never a hang."""
from __future__ import annotations

import time

import pytest

from transport.weights import DiskTransport, ObjectStoreTransport, WeightHandle


def test_disk_fetch_of_a_file_that_never_appears(tmp_path):
    transport = DiskTransport(str(tmp_path))
    handle = WeightHandle(9, "disk", str(tmp_path / "weights-v00000009.safetensors"), 0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="weights version 9: .*did not appear within 0.5s"):
        list(transport.fetch(handle, timeout_s=0.5))
    assert 0.5 <= time.monotonic() - t0 < 0.5 + 1.0


@pytest.mark.slow
def test_object_store_fetch_of_a_ref_that_never_resolves():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    try:
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
    finally:
        ray.shutdown()
