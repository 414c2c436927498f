"""Object-store publishing from a learner rank in Ray: the store copy runs on the rank's second thread, reading the
live weights, and the next optimizer update waits for it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    yield ray
    ray.shutdown()


def test_publishes_in_a_row_each_carry_whole_weights_and_training_waits_for_them(ray_local, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from buffer.testing import fake_batch
    from learner.actor import make_learner_ranks
    from learner.config import LearnerConfig
    from transport.weights import ObjectStoreTransport

    ray = ray_local
    transport = ObjectStoreTransport()
    cfg = LearnerConfig(groups_per_step=2, micro_batch_groups=2, lr=1e-2, track_ref_kl=False, placement_timeout_s=60)
    [rank] = make_learner_ranks(cfg, model_path=tiny_model_dir, group_size=4, temperature=1.0, transport=transport)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    try:
        handles = ray.get([rank.publish.remote(), rank.publish.remote()], timeout=120)  # neither waited for
        for h in handles:
            got = dict(transport.fetch(h, timeout_s=60))
            assert set(got) == set(initial) and h.version == 0
            assert all(torch.equal(got[k], initial[k]) for k in initial)
        # a step right after a publish: its update waits for the store copy, which holds the pre-step weights
        handle = ray.get(rank.publish.remote(), timeout=60)
        out = ray.get(rank.train_step.remote(fake_batch(["a", "b"], group_size=4), True), timeout=120)
        assert out["step"] == 1 and out["metrics"]["weight_sync_wait_s"] >= 0.0
        before = dict(transport.fetch(handle, timeout_s=60))
        after = dict(transport.fetch(out["handle"], timeout_s=60))
        assert all(torch.equal(before[k], initial[k]) for k in initial)  # not torn by the update
        assert max(float((after[k] - initial[k]).abs().max()) for k in initial) > 1e-4  # the step moved them
    finally:
        ray.kill(rank)
