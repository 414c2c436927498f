"""Closed-form gradients and equivalences for the ratio-clipped objectives and Trinity's REC / OPMD.

PPO-style token term L = max(-A u, -A clip(u)) with u = exp(logp - old) differentiates
to -A u where the unclipped branch is taken, and to 0 where the clip (or the dual
clip -c A for A < 0) binds. Notation as in test_objectives_math.py.
"""

from __future__ import annotations

import pytest
import torch

from learner.objectives import LossInputs, ObjectiveConfig, compute_loss
from tests.test_objectives import random_inputs
from tests.test_objectives_math import grad_of, loop_advantage, seq_mean_weights, token_sum_constant

EPS_LO, EPS_HI, DUAL = 0.2, 0.3, 3.0


def unclipped_branch(u, adv, dual_clip):
    """Where PPO's gradient is -A u: inside the clip range or clipped on the harmless side."""
    a = adv[:, None]
    clipped_out = ((a > 0) & (u > 1 + EPS_HI)) | ((a < 0) & (u < 1 - EPS_LO))
    dual = (a < 0) & (u > dual_clip) if dual_clip is not None else torch.zeros_like(u, dtype=torch.bool)
    return (~clipped_out & ~dual).double()


def test_ppo_gradient_with_clip_and_dual_clip():
    inp = random_inputs(seed=20, drift=1.0, group_sizes=(6, 6, 6), length=8)
    cfg = ObjectiveConfig(name="ppo", eps_low=EPS_LO, eps_high=EPS_HI, dual_clip=DUAL)
    _, g = grad_of(cfg, inp)
    u = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    active = unclipped_branch(u, adv, DUAL)
    a = adv[:, None]
    assert (((a < 0) & (u > DUAL)).double() * inp.mask).sum() > 0, "the draw must exercise the dual clip"
    assert ((1 - active) * inp.mask).sum() > 0
    torch.testing.assert_close(g, -a * u * active * seq_mean_weights(inp.mask))


def test_grpo_gradient_with_k3_kl():
    inp = random_inputs(seed=21, drift=0.5)
    beta = 0.05
    _, g = grad_of(ObjectiveConfig(name="grpo", eps_low=EPS_LO, eps_high=EPS_HI, beta=beta), inp)
    u = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids, std=True)
    active = unclipped_branch(u, adv, None)  # GRPO as published has no dual clip
    dk3 = 1 - torch.exp(inp.ref_logp - inp.logp.detach())
    torch.testing.assert_close(g, (-adv[:, None] * u * active + beta * dk3) * seq_mean_weights(inp.mask))


def test_decoupled_ppo_gradient():
    inp = random_inputs(seed=22, drift=0.6)
    cap = 1.5
    cfg = ObjectiveConfig(name="decoupled_ppo", eps_low=EPS_LO, eps_high=EPS_HI, dual_clip=DUAL, is_cap=cap)
    _, g = grad_of(cfg, inp)
    u = torch.exp(inp.logp.detach() - inp.prox_logp)
    w = torch.exp(inp.prox_logp - inp.behaviour_logp).clamp(max=cap)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    active = unclipped_branch(u, adv, DUAL)
    torch.testing.assert_close(g, -w * adv[:, None] * u * active * seq_mean_weights(inp.mask))


def test_gspo_gradient():
    inp = random_inputs(seed=23, drift=0.3)
    eps_lo, eps_hi = 0.02, 0.03
    _, g = grad_of(ObjectiveConfig(name="gspo", eps_low=eps_lo, eps_high=eps_hi), inp)
    n = inp.mask.sum(-1)
    s = torch.exp(((inp.logp.detach() - inp.behaviour_logp) * inp.mask).sum(-1) / n)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    active = ~(((adv > 0) & (s > 1 + eps_hi)) | ((adv < 0) & (s < 1 - eps_lo)))
    assert 0 < active.sum() < len(active), "the draw must clip some sequences and not others"
    # L_i = -A_i s_i, d s_i / d logp_it = s_i m_it / n_i; seq-mean over B sequences of a per-sequence value
    expected = -(adv * s * active)[:, None] * inp.mask / n[:, None] / len(n)
    torch.testing.assert_close(g, expected)


def test_cispo_gradient():
    inp = random_inputs(seed=24, drift=0.5)
    _, g = grad_of(ObjectiveConfig(name="cispo", eps_low=EPS_LO, eps_high=EPS_HI), inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    # the weight is clipped, the gradient is never zeroed
    expected = -rho.clamp(1 - EPS_LO, 1 + EPS_HI) * adv[:, None] * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)


def rec_keep_by_hand(mode, rho, adv, lo=EPS_LO, hi=EPS_HI, ring_lo=0.6, ring_hi=2.0):
    keep = torch.zeros_like(rho)
    for i in range(rho.shape[0]):
        for t in range(rho.shape[1]):
            r, a = float(rho[i, t]), float(adv[i])
            inside = 1 - lo <= r <= 1 + hi
            keep[i, t] = {
                "none": True,
                "two_side": inside,
                "one_side": (a >= 0 and r <= 1 + hi) or (a <= 0 and r >= 1 - lo),
                "ring": inside or (a > 0 and r <= 1 - ring_lo) or (a < 0 and r >= 1 + ring_hi),
            }[mode]
    return keep


@pytest.mark.parametrize("mode", ["none", "one_side", "two_side", "ring"])
@pytest.mark.parametrize("weight", ["none", "is", "tis"])
@pytest.mark.parametrize("regulariser", ["none", "forward_kl", "k2"])
def test_rec_gradient(mode, weight, regulariser):
    inp = random_inputs(seed=25, drift=1.2, group_sizes=(5, 5, 5), length=8)
    c, cap = 0.3, 1.7
    cfg = ObjectiveConfig(name="rec", rec_clip=mode, rec_weight=weight, rec_regulariser=regulariser,
                          rec_reg_coef=c, is_cap=cap, eps_low=EPS_LO, eps_high=EPS_HI)
    _, g = grad_of(cfg, inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    keep = rec_keep_by_hand(mode, rho, adv)
    w = {"none": torch.ones_like(rho), "is": rho, "tis": rho.clamp(max=cap)}[weight]
    reg = {"none": torch.zeros_like(rho), "forward_kl": -c * torch.ones_like(rho),
           "k2": 2 * c * (inp.logp.detach() - inp.behaviour_logp)}[regulariser]
    expected = (-w * adv[:, None] * keep + reg) * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)


def test_rec_ring_keeps_what_two_side_drops_on_the_restoring_side():
    inp = random_inputs(seed=25, drift=1.2, group_sizes=(5, 5, 5), length=8)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    extra = (rec_keep_by_hand("ring", rho, adv) - rec_keep_by_hand("two_side", rho, adv)) * inp.mask
    assert extra.sum() > 0 and (extra >= 0).all()


def test_opmd_token_form_gradient():
    """Per-token square: d/dlogp_it = (-A_i + tau (logp_it - mu_it)) / K."""
    inp = random_inputs(seed=26)
    tau = 0.7
    _, g = grad_of(ObjectiveConfig(name="opmd", opmd_tau=tau, opmd_form="token"), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    expected = (-adv[:, None] + tau * (inp.logp.detach() - inp.behaviour_logp)) * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)


def test_opmd_sequence_form_gradient_is_kimis():
    """Kimi k1.5 squares the sequence log-ratio S_i = sum_t (logp_it - mu_it): every token of sequence i gets
    d/dlogp_it = (-A_i + tau S_i) / K; the loss is sum_i (-A_i sum_t logp_it + tau/2 S_i^2) / K."""
    inp = random_inputs(seed=26)
    tau = 0.7
    loss, g = grad_of(ObjectiveConfig(name="opmd", opmd_tau=tau), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    seq = ((inp.logp.detach() - inp.behaviour_logp) * inp.mask).sum(-1)  # (B,)
    expected = (-adv[:, None] + tau * seq[:, None]) * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)
    value = (-adv * (inp.logp.detach() * inp.mask).sum(-1) + 0.5 * tau * seq**2).sum() / token_sum_constant(inp)
    torch.testing.assert_close(loss, value)
    _, g_token = grad_of(ObjectiveConfig(name="opmd", opmd_tau=tau, opmd_form="token"), inp)
    assert (g - g_token).abs().max() > 1e-3, "the two OPMD forms must differ on multi-token answers"


def test_opmd_sequence_form_hand_computed():
    """One sequence of two tokens, A = 0 (a group of one): log-ratios 0.3 and -0.1, tau = 1, K = 1 * 2.
    sequence: S = 0.2, loss = 0.5 * 0.04 / 2 = 0.01, grad = 0.2 / 2 = 0.1 on both tokens;
    token: loss = 0.5 * (0.09 + 0.01) / 2 = 0.025, grad = (0.15, -0.05)."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor([[-1.3, -1.9]], dtype=torch.float64)
    ones = torch.ones(1, 2, dtype=torch.float64)
    inp = LossInputs(logp, mu, ones, torch.tensor([1.0], dtype=torch.float64), torch.tensor([0]))
    loss_s, g_s = grad_of(ObjectiveConfig(name="opmd"), inp)
    loss_t, g_t = grad_of(ObjectiveConfig(name="opmd", opmd_form="token"), inp)
    torch.testing.assert_close(loss_s, torch.tensor(0.01, dtype=torch.float64))
    torch.testing.assert_close(g_s, torch.tensor([[0.1, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(loss_t, torch.tensor(0.025, dtype=torch.float64))
    torch.testing.assert_close(g_t, torch.tensor([[0.15, -0.05]], dtype=torch.float64))


# ---------------------------------------------------------------- exact equivalences


def test_decoupled_ppo_with_prox_equal_behaviour_is_ppo():
    inp = random_inputs(seed=27, drift=0.8)
    inp.prox_logp = inp.behaviour_logp.clone()
    loss_p, g_p = grad_of(ObjectiveConfig(name="ppo"), inp)
    loss_d, g_d = grad_of(ObjectiveConfig(name="decoupled_ppo"), inp)
    torch.testing.assert_close(loss_d, loss_p)
    torch.testing.assert_close(g_d, g_p)


def test_grpo_without_std_with_token_sum_is_dr_grpo():
    inp = random_inputs(seed=28, drift=0.5)
    cfg = {"beta": 0.04, "eps_low": EPS_LO, "eps_high": EPS_HI}
    loss_g, g_g = grad_of(ObjectiveConfig(name="grpo", normalize_std=False, aggregation="token_sum", **cfg), inp)
    loss_d, g_d = grad_of(ObjectiveConfig(name="dr_grpo", **cfg), inp)
    torch.testing.assert_close(loss_g, loss_d)
    torch.testing.assert_close(g_g, g_d)
    loss_default, _ = grad_of(ObjectiveConfig(name="grpo", **cfg), inp)
    assert not torch.allclose(loss_default, loss_d), "GRPO's defaults must differ from Dr.GRPO's"


def test_rec_without_clip_or_weight_is_reinforce():
    inp = random_inputs(seed=29)
    loss_r, g_r = grad_of(ObjectiveConfig(name="reinforce"), inp)
    loss_c, g_c = grad_of(ObjectiveConfig(name="rec", rec_clip="none"), inp)
    torch.testing.assert_close(loss_c, loss_r)
    torch.testing.assert_close(g_c, g_r)


def test_ppo_on_policy_gradient_is_reinforce_gradient():
    """At u = 1 nothing is clipped and d(-A u)/dlogp = -A: PPO's first step is REINFORCE's."""
    inp = random_inputs(seed=30)
    inp.behaviour_logp = inp.logp.detach().clone()
    agg = "seq_mean_token_mean"
    _, g_p = grad_of(ObjectiveConfig(name="ppo", aggregation=agg), inp)
    _, g_r = grad_of(ObjectiveConfig(name="reinforce", aggregation=agg), inp)
    torch.testing.assert_close(g_p, g_r)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "cfg",
    [
        ObjectiveConfig(name="ppo"),
        ObjectiveConfig(name="grpo", beta=0.1),
        ObjectiveConfig(name="dr_grpo"),
        ObjectiveConfig(name="decoupled_ppo"),
        ObjectiveConfig(name="gspo"),
        ObjectiveConfig(name="opmd"),
        ObjectiveConfig(name="opmd", opmd_form="token"),
    ],
    ids=lambda c: c.name,
)
def test_gradcheck(cfg):
    inp = random_inputs(seed=31, group_sizes=(3, 2), length=4, drift=0.1)

    def f(logp):
        return compute_loss(cfg, LossInputs(logp, inp.behaviour_logp, inp.mask, inp.rewards, inp.group_ids,
                                            inp.ref_logp, inp.prox_logp))[0]

    assert torch.autograd.gradcheck(f, (inp.logp,))


@pytest.mark.parametrize("aggregation", ["token_sum", "seq_mean_token_mean"])
def test_decoupled_ppo_at_one_update_per_batch_is_tis(aggregation):
    # verl's TIS (a truncated weight min(old / mu, C) on the PPO loss, old = the trainer's pre-update policy) is
    # decoupled_ppo. With learner.updates_per_batch 1, prox is the policy being updated, so u = 1, the clip never
    # binds and its gradient is tis's, -min(pi / mu, C) A grad logp: the two differ only in their default aggregation.
    inp = random_inputs(seed=29, drift=1.0)
    inp.prox_logp = inp.logp.detach().clone()
    cap = 1.5
    _, g_d = grad_of(ObjectiveConfig(name="decoupled_ppo", is_cap=cap, aggregation=aggregation), inp)
    _, g_t = grad_of(ObjectiveConfig(name="tis", is_cap=cap, aggregation=aggregation), inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    assert ((rho > cap).double() * inp.mask).sum() > 0, "the draw must exercise the cap"
    torch.testing.assert_close(g_d, g_t)
