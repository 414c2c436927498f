"""Every registered objective: runs, is finite, reports the metrics, refuses missing inputs; config validation."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from learner.objectives import (
    REGISTRY,
    LossInputs,
    ObjectiveConfig,
    compute_loss,
    needs_proximal,
    needs_reference,
)
from learner.objectives.config import ObjectiveName

REQUIRED_METRICS = {"mismatch", "is_weight_ess", "clip_frac", "mask_frac", "adv_mean", "adv_std", "kl_to_ref"}


def random_inputs(
    seed: int = 0,
    group_sizes: tuple[int, ...] = (4, 3, 5),
    length: int = 6,
    drift: float = 0.3,
    dtype: torch.dtype = torch.float64,
) -> LossInputs:
    """Ragged random batch: non-contiguous group ids, responses of 1..T tokens, mu/ref/prox near pi."""
    gen = torch.Generator().manual_seed(seed)
    batch = sum(group_sizes)
    ids = torch.tensor([7, 2, 11, 5, 3][: len(group_sizes)]).repeat_interleave(torch.tensor(group_sizes))  # (B,)
    logits = torch.randn(batch, length, 8, generator=gen, dtype=dtype)  # (B, T, V)
    logp = torch.log_softmax(logits, -1)[..., 0].clone().requires_grad_(True)  # (B, T)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)  # (B,)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)  # (B, T)

    def near() -> torch.Tensor:
        return logp.detach() + drift * torch.randn(batch, length, generator=gen, dtype=dtype)  # (B, T)

    rewards = torch.randn(batch, generator=gen, dtype=dtype)  # (B,)
    return LossInputs(logp=logp, behaviour_logp=near(), mask=mask, rewards=rewards, group_ids=ids,
                      ref_logp=near(), prox_logp=near())


def config_for(name: str, **overrides) -> ObjectiveConfig:
    return ObjectiveConfig(name=name, **({"beta": 0.1} | overrides))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_runs_finite_scalar_with_grad_and_metrics(name):
    inp = random_inputs()
    loss, metrics = compute_loss(config_for(name), inp)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert inp.logp.grad is not None and torch.isfinite(inp.logp.grad).all()
    assert inp.logp.grad.abs().sum() > 0, "objective gives no gradient"
    assert (inp.logp.grad * (1 - inp.mask)).abs().sum() == 0, "padding received gradient"
    assert REQUIRED_METRICS <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_sum", None])
def test_every_aggregation_runs(name, aggregation):
    try:
        cfg = config_for(name, aggregation=aggregation)
    except ValidationError:
        assert name in {"dpo", "ipo"} and aggregation == "seq_mean_token_mean"
        return
    loss, _ = compute_loss(cfg, random_inputs(seed=1))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_missing_reference_or_proximal_raises(name):
    cfg = config_for(name)
    inp = random_inputs()
    if needs_reference(cfg):
        inp.ref_logp = None
        with pytest.raises(ValueError, match="ref_logp"):
            compute_loss(cfg, inp)
    inp = random_inputs()
    if needs_proximal(cfg):
        inp.prox_logp = None
        with pytest.raises(ValueError, match="prox_logp"):
            compute_loss(cfg, inp)
    if not needs_reference(cfg) and not needs_proximal(cfg):
        inp = random_inputs()
        inp.ref_logp, inp.prox_logp = None, None
        loss, metrics = compute_loss(cfg, inp)
        assert torch.isfinite(loss) and "kl_to_ref" not in metrics


def test_needs_flags():
    assert needs_reference(ObjectiveConfig(name="agro", beta=0.1))
    assert not needs_reference(ObjectiveConfig(name="agro", beta=0.0))
    assert not needs_reference(ObjectiveConfig(name="reinforce"))
    assert needs_reference(ObjectiveConfig(name="kl_pg"))
    assert not needs_proximal(ObjectiveConfig(name="tis"))


@pytest.mark.parametrize("field", ["behaviour_logp", "mask", "ref_logp"])
def test_shape_mismatch_raises(field):
    inp = random_inputs()
    setattr(inp, field, getattr(inp, field)[:, :-1])
    with pytest.raises(ValueError, match=field):
        compute_loss(ObjectiveConfig(name="kl_pg"), inp)


def test_rewards_shape_mismatch_raises():
    inp = random_inputs()
    inp.rewards = inp.rewards[:-1]
    with pytest.raises(ValueError, match="rewards"):
        compute_loss(ObjectiveConfig(name="reinforce"), inp)


def test_max_len_shorter_than_batch_raises():
    with pytest.raises(ValueError, match="max_len"):
        compute_loss(ObjectiveConfig(name="reinforce", max_len=2), random_inputs(length=6))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": -0.1}, "beta"),
        ({"eps_low": 1.5}, "eps_low"),
        ({"eps_high": 0.0}, "eps_high"),
        ({"is_cap": 0.5}, "is_cap"),
        ({"mask_low": 3.0, "mask_high": 2.0}, "mask_low"),
        ({"seq_low": 1.2, "seq_high": 1.1}, "seq_low"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"name": "nope"}, "name"),
        ({"max_len": 0}, "max_len"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"not_a_field": 1}, "not_a_field"),
        ({"name": "agro", "normalize_std": True}, "normalize_std"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        ObjectiveConfig(**kwargs)


def test_every_config_field_is_documented():
    for name, info in ObjectiveConfig.model_fields.items():
        assert info.description, f"ObjectiveConfig.{name} has no description"


def test_default_aggregations_are_declared():
    for name, entry in REGISTRY.items():
        assert entry.aggregation in {"seq_mean_token_mean", "token_sum"}, name
        assert entry.fn.__doc__ and "Default" in entry.fn.__doc__, f"{name} does not document its default"


def test_registry_covers_every_config_name():
    assert set(REGISTRY) == set(get_args(ObjectiveName))
