"""The learner's CPU knobs: `learner.num_threads` reaches the rank's torch, `learner.autocast_bf16` runs the model in
bf16 with fp32 weights and log-probs, and every step reports where its time went."""
from __future__ import annotations

import pytest
import torch

from learner.batch import to_tensors
from learner.config import LearnerConfig
from tests.test_learner_microbatch import micro_learner, micro_model_dir, ragged_batch  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def ray2():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("num_threads, want", [(None, 1), (2, 2)])
def test_a_learner_rank_runs_torch_on_num_threads(ray2, micro_model_dir, num_threads, want):
    """A real rank actor (num_cpus 1, where Ray would leave OMP_NUM_THREADS=1): its torch and its OpenMP pool use
    learner.num_threads, or one thread per reserved CPU when unset (the default keeps that behaviour)."""
    from learner.actor import make_learner_ranks

    from learner.objectives import ObjectiveConfig

    cfg = LearnerConfig(num_cpus=1, num_threads=num_threads, groups_per_step=2, placement_timeout_s=60,
                        objective=ObjectiveConfig(name="grpo"))
    (rank,) = make_learner_ranks(cfg, model_path=micro_model_dir, group_size=3, temperature=1.0, transport=None)
    try:
        seen = ray2.get(rank.__ray_call__.remote(
            lambda self: (torch.get_num_threads(), __import__("os").environ["OMP_NUM_THREADS"])), timeout=120)
    finally:
        ray2.kill(rank)
    assert seen == (want, str(want))


@pytest.mark.slow
def test_plain_learner_applies_num_threads(micro_model_dir, dist_env):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        micro_learner(micro_model_dir, num_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_autocast_bf16_runs_the_layers_in_bf16_and_keeps_fp32_weights_and_logprobs(micro_model_dir, dist_env):
    plain, cast = micro_learner(micro_model_dir), micro_learner(micro_model_dir, autocast_bf16=True)
    mb = to_tensors(ragged_batch(), pad_id=0)
    dtypes = []
    layer = cast.engine.module.model.layers[0].mlp.down_proj
    hook = layer.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    logp, _ = cast._forward(cast.engine, mb)
    hook.remove()
    want, _ = plain._forward(plain.engine, mb)
    assert dtypes == [torch.bfloat16] and logp.dtype == torch.float32
    err = float((logp - want).detach().abs().max())
    assert 0 < err < 0.05, err  # bf16 layers: not the fp32 numbers, but close to them
    metrics = cast.train_step(ragged_batch())
    assert all(p.dtype == torch.float32 for p in cast.engine.module.parameters())
    assert torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.slow
def test_a_step_reports_where_its_time_went(micro_model_dir, dist_env):
    m = micro_learner(micro_model_dir, max_tokens_per_micro_batch=20).train_step(ragged_batch())
    parts = [m[f"learner_{k}_s"] for k in ("prepare", "forward", "backward", "optimizer")]
    assert m["micro_batches"] >= 3 and all(p > 0 for p in parts)
    assert sum(parts) <= m["learner_step_s"] < 1.5 * sum(parts) + 0.05  # the parts cover the step


def test_autocast_bf16_needs_fp32_weights():
    with pytest.raises(ValueError, match="autocast_bf16"):
        LearnerConfig(autocast_bf16=True, dtype="bfloat16")
