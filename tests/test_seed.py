"""`seed` in the run config reaches every component; the same seed gives the same starting weights, the same
global random streams in a learner and the same data order, and another seed changes them."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from buffer.config import BufferConfig
from buffer.replay import ReplayBuffer
from buffer.testing import fake_batch
from launch.config import RunConfig, load_config
from launch.data import PromptStream, load_prompts

COMPONENTS = ("model", "data", "actors", "buffer", "learner")


def _seeds(cfg: RunConfig) -> dict[str, int]:
    return {name: getattr(cfg, name).seed for name in COMPONENTS}


def test_run_seed_is_every_components_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 7\n")
    assert _seeds(load_config(str(path))) == dict.fromkeys(COMPONENTS, 7)
    assert _seeds(load_config(None, {"seed": 7})) == dict.fromkeys(COMPONENTS, 7)
    assert _seeds(RunConfig(seed=5)) == dict.fromkeys(COMPONENTS, 5)
    # a component's own seed wins, also when it equals the old default
    path.write_text("seed: 7\nbuffer:\n  seed: 3\nactors:\n  seed: 0\n")
    cfg = load_config(str(path))
    assert _seeds(cfg) == {"model": 7, "data": 7, "actors": 0, "buffer": 3, "learner": 7}
    # what the run directory's config.yaml holds reads back as the same seeds (a resumed run keeps them)
    assert _seeds(RunConfig.model_validate(cfg.model_dump(mode="json"))) == _seeds(cfg)
    assert RunConfig().actors.seed == 0 and RunConfig(seed=9).actors.seed == 9  # defaults are not shared state


def _group_ids(batch) -> list[str]:
    return list(dict.fromkeys(batch.column("group_id").to_pylist()))


def _sample_order(cfg: BufferConfig) -> list[list[str]]:
    """20 samples of 2 groups out of 16 held ones."""
    buf = ReplayBuffer(cfg, groups_per_step=2)
    buf.put(fake_batch([f"g{i}" for i in range(16)]))
    return [_group_ids(buf.sample(2, 0, timeout=1)) for _ in range(20)]


def _data_order(seed: int) -> tuple[list[str], list[list[str]]]:
    """The prompt stream over 1.5 epochs and the uniform sampler's picks, as the run's seed sets them."""
    cfg = load_config(None, {"seed": seed, "buffer.sampler": "uniform", "buffer.max_reuse": 1000})
    stream = PromptStream(load_prompts(cfg.data.train, cfg.data).prompts, cfg.data.seed)
    prompts = [p.id for p in stream.take(150)]  # 100 prompts: crosses into the second epoch's shuffle
    return prompts, _sample_order(cfg.buffer)


def test_same_seed_same_data_order_other_seed_another():
    prompts, samples = _data_order(7)
    assert (prompts, samples) == _data_order(7)
    other_prompts, other_samples = _data_order(8)
    assert other_prompts != prompts and other_samples != samples
    assert sorted(other_prompts[:100]) == sorted(prompts[:100])  # the same prompts, another order
    # the buffer drew from its own generator, seeded with the run's seed
    assert _sample_order(BufferConfig(sampler="uniform", max_reuse=1000, seed=7)) == samples


def _scramble_global_rngs() -> None:
    """Leave Python, NumPy and torch somewhere unrepeatable, so only a learner that seeds them can repeat a draw."""
    random.seed()
    np.random.seed()
    torch.seed()


@pytest.mark.slow
def test_learner_same_seed_same_start_other_seed_another(dist_env, tmp_path):
    from launch.model import build_default_model
    from learner.learner import Learner

    def start(seed: int):
        cfg = load_config(None, {"seed": seed, "model.warm_start_steps": 0, "learner.groups_per_step": 2,
                                 "learner.micro_batch_groups": 2, "learner.track_ref_kl": False,
                                 "actors.prompts_per_request": 2})
        model_dir = build_default_model(cfg.model, cfg.data.max_operand, tmp_path)  # initialised from model.seed
        _scramble_global_rngs()
        learner = Learner(cfg.learner, model_dir, group_size=4, temperature=1.0)
        draws = (torch.rand(8).tolist(), np.random.random(8).tolist(), [random.random() for _ in range(8)])
        return learner.full_state(), draws

    weights, draws = start(7)
    again, draws_again = start(7)
    assert draws_again == draws
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    other, other_draws = start(8)
    assert all(a != b for a, b in zip(other_draws, draws))
    assert any(not torch.equal(weights[k], other[k]) for k in weights)
