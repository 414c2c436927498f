"""Deferred publishing from a learner rank in Ray: the transport's copy runs on the rank's second thread, reading
the live weights, and the next optimizer update waits for it, so a late copy is never torn by training."""
from __future__ import annotations

import gc
import time

import pytest
import torch

from transport.object_store import ObjectStoreTransport

pytestmark = pytest.mark.slow

DELAY_S = 5.0  # how long each deferred copy sleeps before it reads the weights


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    yield ray
    ray.shutdown()


class LateObjectStore(ObjectStoreTransport):
    """The object store, its deferred copy starting `DELAY_S` late: still running when the next update comes."""

    def publish(self, version, state, defer=None):
        def late_defer(copy):
            def late_copy():
                time.sleep(DELAY_S)
                return copy()

            return defer(late_copy)

        return super().publish(version, state, defer=None if defer is None else late_defer)


def test_a_late_deferred_copy_holds_the_next_update_and_carries_its_own_version_whole(ray_local, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from buffer.testing import fake_batch
    from learner.actor import make_learner_ranks
    from learner.config import LearnerConfig
    from learner.objectives import ObjectiveConfig

    ray = ray_local
    transport = LateObjectStore()
    cfg = LearnerConfig(groups_per_step=2, micro_batch_groups=2, lr=1e-2, objective=ObjectiveConfig(max_len=8), placement_timeout_s=60)
    [rank] = make_learner_ranks(cfg, model_path=tiny_model_dir, group_size=4, temperature=1.0, transport=transport)
    batch = fake_batch(["a", "b"], group_size=4)
    try:
        ray.get(rank.pid.remote(), timeout=120)  # started: the timings below are of training alone
        t0 = time.monotonic()
        first = ray.get(rank.train_step.remote(batch, True), timeout=120)
        # version 1 as the rank holds it, read while its deferred copy still sleeps
        saved = load_file(f"{ray.get(rank.save_pretrained.remote(str(tmp_path / 'v1')), timeout=120)}/model.safetensors")
        second = ray.get(rank.train_step.remote(batch, True), timeout=120)
        elapsed = time.monotonic() - t0

        assert (first["step"], first["handle"].version, second["handle"].version) == (1, 1, 2)
        # after its first step the rank's heap is frozen: a full collection would rescan ~465k objects (0.24 s)
        tracked, frozen = ray.get(rank.__ray_call__.remote(lambda a: (len(gc.get_objects()), gc.get_freeze_count())))
        assert tracked < 5_000 < frozen, (tracked, frozen)
        assert first["metrics"]["weight_sync_s"] < 1.0  # publish returned without waiting for the copy
        # The copy of version 1 started after t0 and ends DELAY_S later; the second update began before `second`
        # returned, so it waited at least DELAY_S - elapsed.
        waited = second["metrics"]["weight_sync_wait_s"]
        assert waited >= DELAY_S - elapsed and waited > 1.0, (waited, elapsed)
        v1 = dict(transport.fetch(first["handle"], timeout_s=60))
        v2 = dict(transport.fetch(second["handle"], timeout_s=60))
        assert saved and all(torch.equal(v1[k], saved[k]) for k in saved)  # read late, yet untouched by update 2
        assert max(float((v2[k] - v1[k]).abs().max()) for k in saved) > 1e-4  # update 2 did move the weights
    finally:
        ray.kill(rank)
