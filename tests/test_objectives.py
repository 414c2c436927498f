"""Every registered objective: runs, is finite, reports the metrics, refuses missing inputs, applies its registered
defaults; each aggregation's exact value; config validation."""

from __future__ import annotations

import math
import re
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
from learner.objectives.common import aggregate
from learner.objectives.config import READS, ObjectiveName
from learner.objectives.registry import resolve

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
    """beta 0.1 where the objective reads beta (kl terms on, DPO defined); other objectives refuse it."""
    beta = {"beta": 0.1} if "beta" in READS[name] else {}
    return ObjectiveConfig(name=name, **(beta | overrides))


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


def test_aggregate_exact_values():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # (B, T)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # (B, T) row 3 fully rejected
    # token_sum: kept terms over the constant B * T (or B * max_len), whatever was kept
    assert float(aggregate(token_loss, mask, "token_sum", None)) == pytest.approx((1 + 2 + 4) / (3 * 3))
    assert float(aggregate(token_loss, mask, "token_sum", 5)) == pytest.approx((1 + 2 + 4) / (3 * 5))
    # seq_mean_token_mean: each live sequence's token mean, then the mean over live sequences only
    assert float(aggregate(token_loss, mask, "seq_mean_token_mean", None)) == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    with pytest.raises(ValueError, match="unknown aggregation 'token_mean'"):
        aggregate(token_loss, mask, "token_mean", None)


def _hand_batch() -> LossInputs:
    """One group of two answers, rewards 1 and 0 (advantages +0.5 and -0.5), of 2 and 1 response tokens."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=torch.float64, requires_grad=True)  # (B, T)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (B, T)
    return LossInputs(logp=logp, behaviour_logp=logp.detach().clone(), mask=mask,
                      rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), group_ids=torch.tensor([0, 0]))


@pytest.mark.parametrize(("aggregation", "expected"), [
    # token loss -A * logp: row 1 +0.5 * (1, 2), row 2 -0.5 * 4
    ("token_sum", (0.5 + 1.0 - 2.0) / (2 * 3)),
    ("seq_mean_token_mean", ((0.5 + 1.0) / 2 + (-2.0) / 1) / 2),
    (None, (0.5 + 1.0 - 2.0) / (2 * 3)),  # reinforce's own default
])
def test_reinforce_loss_under_each_aggregation(aggregation, expected):
    loss, _ = compute_loss(ObjectiveConfig(name="reinforce", aggregation=aggregation), _hand_batch())
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unset_knobs_take_the_registered_defaults(name):
    """aggregation=None and normalize_std=None give exactly the loss of the registry's defaults spelt out, and
    (where the objective reads the knob) the other value gives another loss, so the default is really applied."""
    entry = REGISTRY[name]
    other = {"token_sum": "seq_mean_token_mean", "seq_mean_token_mean": "token_sum"}[entry.aggregation]
    resolved = resolve(config_for(name))
    assert (resolved.aggregation, resolved.normalize_std) == (entry.aggregation, entry.normalize_std)
    default, _ = compute_loss(config_for(name), random_inputs(seed=1))
    spelt = {"aggregation": entry.aggregation, "normalize_std": entry.normalize_std}
    spelt_out, _ = compute_loss(config_for(name, **{k: v for k, v in spelt.items() if k in READS[name]}),
                                random_inputs(seed=1))
    assert default.item() == spelt_out.item()
    if name in {"dpo", "ipo"}:  # pairwise: a mean over pairs of sequence sums, no aggregation to choose
        with pytest.raises(ValidationError, match="aggregation"):
            config_for(name, aggregation=other)
    else:
        changed, _ = compute_loss(config_for(name, aggregation=other), random_inputs(seed=1))
        assert changed.item() != pytest.approx(default.item()), f"{name} ignores aggregation"
    if entry.normalize_std:
        unnormalised, _ = compute_loss(config_for(name, normalize_std=False), random_inputs(seed=1))
        assert unnormalised.item() != pytest.approx(default.item()), f"{name} ignores normalize_std"


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


def test_documented_default_aggregation_is_the_registered_one():
    for name, entry in REGISTRY.items():
        stated = re.search(r"Default: (\w+)", entry.fn.__doc__ or "")
        assert stated, f"{name}: the docstring does not state its default aggregation"
        assert stated.group(1) == entry.aggregation, \
            f"{name}: the docstring says {stated.group(1)}, the registry applies {entry.aggregation}"


def test_registry_covers_every_config_name():
    assert set(REGISTRY) == set(get_args(ObjectiveName))


# ---------------------------------------------------------------- which knobs each objective reads

# A value that changes the loss wherever the knob is read, and what must hold for it to be read at all.
_PERTURB = {
    "aggregation": None, "max_len": 12, "loo": True, "normalize_std": True, "beta": 0.3, "kl_estimator": "k1",
    "eps_low": 0.6, "eps_high": 0.05, "dual_clip": 1.1, "is_cap": 1.05, "mask_low": 0.95, "mask_high": 1.05,
    "seq_low": 0.5, "seq_high": 1.01, "rec_clip": "two_side", "rec_weight": "is", "rec_regulariser": "k2",
    "rec_reg_coef": 0.5, "ring_eps_low": 0.3, "ring_eps_high": 0.5, "asymre_delta": 0.5, "opmd_tau": 3.0,
    "opmd_form": "token", "ipo_tau": 0.5,
}
_ENABLE = {("rec", "is_cap"): {"rec_weight": "tis"}, ("rec", "rec_reg_coef"): {"rec_regulariser": "k2"},
           ("rec", "ring_eps_low"): {"rec_clip": "ring"}, ("rec", "ring_eps_high"): {"rec_clip": "ring"}}
_ENABLE_ANY = {"max_len": {"aggregation": "token_sum"}}  # the constant exists under token_sum only


def _loss_and_grad(cfg: ObjectiveConfig) -> tuple[float, torch.Tensor]:
    inp = random_inputs(seed=3, drift=0.8)
    loss, _ = compute_loss(cfg, inp)
    loss.backward()
    return loss.item(), inp.logp.grad


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_reads_table_matches_the_code(name):
    """READS is the code's truth: a knob outside an objective's row changes nothing (so refusing it refuses
    nothing that works), and a knob inside it changes the loss or the gradient (so none is listed idly).
    model_construct skips validation, so unread knobs can be set to see that the function ignores them."""
    base = config_for(name).model_dump()
    assert set(_PERTURB) == set(ObjectiveConfig.model_fields) - {"name"}
    for knob, value in _PERTURB.items():
        if knob == "aggregation":
            value = {"token_sum": "seq_mean_token_mean"}.get(REGISTRY[name].aggregation, "token_sum")
        if knob == "normalize_std":
            value = not REGISTRY[name].normalize_std
        enable = base | _ENABLE_ANY.get(knob, {}) | _ENABLE.get((name, knob), {})
        ref_loss, ref_grad = _loss_and_grad(ObjectiveConfig.model_construct(**enable))
        loss, grad = _loss_and_grad(ObjectiveConfig.model_construct(**(enable | {knob: value})))
        changed = loss != pytest.approx(ref_loss, abs=1e-12) or not torch.allclose(grad, ref_grad, atol=1e-12)
        assert changed == (knob in READS[name]), f"{name}: {knob} {'is' if changed else 'is not'} read"


@pytest.mark.parametrize(("name", "knob", "value"), [
    ("gspo", "beta", 0.1), ("cispo", "beta", 0.1), ("decoupled_ppo", "beta", 0.1), ("tis", "beta", 0.1),
    ("rec", "beta", 0.1), ("opmd", "beta", 0.1), ("asymre", "beta", 0.1), ("grpo", "dual_clip", 2.0),
    ("reinforce", "is_cap", 3.0), ("ppo", "rec_clip", "ring"), ("dpo", "loo", True), ("ipo", "beta", 0.1),
    ("dpo", "aggregation", "seq_mean_token_mean"), ("agro", "opmd_tau", 2.0),
])
def test_a_knob_the_objective_ignores_raises_naming_both(name, knob, value):
    with pytest.raises(ValidationError, match=rf"{knob}=.*not read by objective '{name}'"):
        ObjectiveConfig(name=name, **({"beta": 0.1} if name == "dpo" else {}), **{knob: value})


def test_explicit_defaults_of_unread_knobs_are_accepted():
    """A resumed run's config.yaml spells out every field: its defaults must load for every objective."""
    for name in REGISTRY:
        dumped = ObjectiveConfig(name=name, **({"beta": 0.1} if name == "dpo" else {})).model_dump()
        assert ObjectiveConfig(**dumped) == ObjectiveConfig.model_validate(dumped)


def test_ring_bounds_apply_to_rec_ring_only():
    """REC's ring must lie outside its two-sided band; no other objective has a ring."""
    ObjectiveConfig(name="cispo", eps_high=4.0)
    ObjectiveConfig(name="ppo", eps_low=0.7)
    ObjectiveConfig(name="rec", rec_clip="one_side", eps_high=4.0)
    with pytest.raises(ValidationError, match="ring_eps_high"):
        ObjectiveConfig(name="rec", rec_clip="ring", eps_high=4.0)
    with pytest.raises(ValidationError, match="ring_eps_low"):
        ObjectiveConfig(name="rec", rec_clip="ring", eps_low=0.7)
