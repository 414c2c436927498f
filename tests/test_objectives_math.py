"""Proofs as tests: autograd's gradient equals a hand-derived closed form; exact equivalences.

Notation in the closed forms: m = mask (B, T), A = advantage (B,), rho = exp(logp - mu),
K = B * T (the token_sum constant), n_i = tokens of sequence i, B' = sequences with a kept token.
Advantages are recomputed here with plain Python loops, independently of common.group_advantage.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.objectives import LossInputs, ObjectiveConfig, compute_loss
from tests.test_objectives import random_inputs


def loop_advantage(values, ids, *, loo=False, std=False, delta=0.0):
    """A_i = v_i - mean of its group (or of the others), optionally / (unbiased std + 1e-6)."""
    values, ids = values.tolist(), ids.tolist()
    out = []
    for i, (v, g) in enumerate(zip(values, ids)):
        group = [values[j] for j in range(len(values)) if ids[j] == g]
        others = [values[j] for j in range(len(values)) if ids[j] == g and j != i]
        if loo:
            base = sum(others) / len(others) if others else v
        else:
            base = sum(group) / len(group)
        a = v - base - delta
        if std:
            mean = sum(group) / len(group)
            sd = math.sqrt(sum((x - mean) ** 2 for x in group) / max(len(group) - 1, 1))
            a = (v - base) / (sd + 1e-6)
        out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def grad_of(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    inp.logp.grad = None
    loss, _ = compute_loss(cfg, inp)
    loss.backward()
    return loss.detach(), inp.logp.grad.clone()


def token_sum_constant(inp: LossInputs) -> float:
    return inp.logp.shape[0] * inp.logp.shape[1]


def seq_mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """d(seq-mean-token-mean)/d(token term) = m_it / (n_i * B')."""
    n = mask.sum(-1, keepdim=True)  # (B, 1)
    live = (n > 0).sum()
    return mask / n.clamp(min=1) / live  # (B, T)


# ---------------------------------------------------------------- closed-form gradients


@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("std", [False, True])
def test_reinforce_gradient(loo, std):
    inp = random_inputs(seed=3)
    _, g = grad_of(ObjectiveConfig(name="reinforce", loo=loo, normalize_std=std), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids, loo=loo, std=std)
    # d/dlogp_it of -(1/K) sum A_i m_it logp_it
    expected = -adv[:, None] * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)


def test_reinforce_seq_mean_gradient():
    inp = random_inputs(seed=4)
    _, g = grad_of(ObjectiveConfig(name="reinforce", aggregation="seq_mean_token_mean"), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    torch.testing.assert_close(g, -adv[:, None] * seq_mean_weights(inp.mask))


def test_tis_gradient():
    inp = random_inputs(seed=5, drift=1.0)
    cap = 1.5
    _, g = grad_of(ObjectiveConfig(name="tis", is_cap=cap), inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    # w = min(rho, C) is a constant to autograd: grad = -min(rho, C) A m / K
    expected = -rho.clamp(max=cap) * adv[:, None] * inp.mask / token_sum_constant(inp)
    assert (rho > cap).any() and (rho < cap).any(), "the draw must exercise the cap"
    torch.testing.assert_close(g, expected)


def test_icepop_gradient():
    inp = random_inputs(seed=6, drift=1.0)
    lo, hi = 0.5, 2.0
    _, g = grad_of(ObjectiveConfig(name="icepop", mask_low=lo, mask_high=hi), inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    keep = ((rho >= lo) & (rho <= hi)).double()
    adv = loop_advantage(inp.rewards, inp.group_ids)
    assert (keep * inp.mask).sum() < inp.mask.sum(), "the draw must reject some tokens"
    torch.testing.assert_close(g, -keep * rho * adv[:, None] * inp.mask / token_sum_constant(inp))


def test_icepop_rejected_tokens_leave_seq_mean_denominator():
    inp = random_inputs(seed=6, drift=1.0)
    _, g = grad_of(ObjectiveConfig(name="icepop", aggregation="seq_mean_token_mean"), inp)
    rho = torch.exp(inp.logp.detach() - inp.behaviour_logp)
    kept = ((rho >= 0.5) & (rho <= 2.0)).double() * inp.mask
    adv = loop_advantage(inp.rewards, inp.group_ids)
    torch.testing.assert_close(g, -rho * adv[:, None] * seq_mean_weights(kept))


def test_seq_is_gradient():
    inp = random_inputs(seed=7, drift=0.5)
    cap = 2.0
    _, g = grad_of(ObjectiveConfig(name="seq_is", is_cap=cap), inp)
    w = torch.exp(((inp.logp.detach() - inp.behaviour_logp) * inp.mask).sum(-1)).clamp(max=cap)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    torch.testing.assert_close(g, -(w * adv)[:, None] * inp.mask / token_sum_constant(inp))


def test_geo_mask_gradient():
    inp = random_inputs(seed=8, drift=0.3)
    lo, hi = 0.9, 1.1
    _, g = grad_of(ObjectiveConfig(name="geo_mask", seq_low=lo, seq_high=hi), inp)
    log_rho = (inp.logp.detach() - inp.behaviour_logp) * inp.mask
    geo = torch.exp(log_rho.sum(-1) / inp.mask.sum(-1))
    keep = ((geo >= lo) & (geo <= hi)).double()
    assert 0 < keep.sum() < len(keep), "the draw must keep some sequences and drop others"
    adv = loop_advantage(inp.rewards, inp.group_ids)
    torch.testing.assert_close(g, -(keep * adv)[:, None] * inp.mask / token_sum_constant(inp))


def test_asymre_gradient():
    inp = random_inputs(seed=9)
    _, g = grad_of(ObjectiveConfig(name="asymre", asymre_delta=-0.1), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids, delta=-0.1)
    torch.testing.assert_close(g, -adv[:, None] * inp.mask / token_sum_constant(inp))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_pg_gradient(estimator):
    inp = random_inputs(seed=10)
    beta = 0.3
    _, g = grad_of(ObjectiveConfig(name="kl_pg", beta=beta, kl_estimator=estimator), inp)
    adv = loop_advantage(inp.rewards, inp.group_ids)
    d = inp.logp.detach() - inp.ref_logp  # log(pi/ref)
    # d/dlogp: k1 -> 1; k2 = d^2/2 -> d; k3 = e^{-d} + d - 1 -> 1 - e^{-d}
    dkl = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[estimator]
    expected = (-adv[:, None] + beta * dkl) * inp.mask / token_sum_constant(inp)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("loo", [False, True])
def test_agro_gradient(loo):
    inp = random_inputs(seed=11)
    beta = 0.2
    _, g = grad_of(ObjectiveConfig(name="agro", beta=beta, loo=loo), inp)
    k = ((inp.logp.detach() - inp.ref_logp) * inp.mask).sum(-1)
    adv = loop_advantage(inp.rewards - beta * k, inp.group_ids, loo=loo)
    # R_i = r_i - beta sg(k_i): grad = -(R_i - baseline_i) m / K
    torch.testing.assert_close(g, -adv[:, None] * inp.mask / token_sum_constant(inp))


def test_agro_gradient_is_variance_gradient_over_beta():
    """With the group-mean baseline, AGRO's gradient equals d/dlogp [ (1/(2 beta K)) sum_groups sum_i (R_i - mean R)^2 ]
    when R carries grad: the consistency loss itself, which is what makes pi* its fixed point."""
    inp = random_inputs(seed=12)
    beta = 0.25
    _, g = grad_of(ObjectiveConfig(name="agro", beta=beta), inp)
    logp = inp.logp.detach().clone().requires_grad_(True)
    r = inp.rewards - beta * ((logp - inp.ref_logp) * inp.mask).sum(-1)
    var = torch.zeros((), dtype=torch.float64)
    for gid in inp.group_ids.unique():
        rg = r[inp.group_ids == gid]
        var = var + ((rg - rg.mean()) ** 2).sum() / 2
    (var / (beta * token_sum_constant(inp))).backward()
    torch.testing.assert_close(g, logp.grad)


# ---------------------------------------------------------------- exact equivalences


def test_tis_with_on_policy_data_is_reinforce():
    inp = random_inputs(seed=13)
    inp.behaviour_logp = inp.logp.detach().clone()
    loss_r, g_r = grad_of(ObjectiveConfig(name="reinforce"), inp)
    loss_t, g_t = grad_of(ObjectiveConfig(name="tis"), inp)
    torch.testing.assert_close(loss_t, loss_r)
    torch.testing.assert_close(g_t, g_r)


@pytest.mark.parametrize("aggregation", ["token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("loo", [False, True])
def test_agro_with_zero_beta_is_reinforce(aggregation, loo):
    inp = random_inputs(seed=14)
    loss_r, g_r = grad_of(ObjectiveConfig(name="reinforce", aggregation=aggregation, loo=loo), inp)
    loss_a, g_a = grad_of(ObjectiveConfig(name="agro", beta=0.0, aggregation=aggregation, loo=loo), inp)
    torch.testing.assert_close(loss_a, loss_r)
    torch.testing.assert_close(g_a, g_r)


def test_kl_pg_with_zero_beta_is_reinforce():
    inp = random_inputs(seed=15)
    loss_r, g_r = grad_of(ObjectiveConfig(name="reinforce"), inp)
    loss_k, g_k = grad_of(ObjectiveConfig(name="kl_pg", beta=0.0), inp)
    torch.testing.assert_close(loss_k, loss_r)
    torch.testing.assert_close(g_k, g_r)


def test_token_sum_uses_max_len_constant():
    inp = random_inputs(seed=16, length=6)
    loss6, _ = grad_of(ObjectiveConfig(name="reinforce"), inp)
    loss12, _ = grad_of(ObjectiveConfig(name="reinforce", max_len=12), inp)
    torch.testing.assert_close(loss12, loss6 / 2)


def _padded_to(inp: LossInputs, length: int) -> LossInputs:
    """The same rows with T = length: extra padding columns, mask 0 there."""
    def pad(x):
        return None if x is None else torch.nn.functional.pad(x.detach(), (0, length - x.shape[1]))
    logp = pad(inp.logp).requires_grad_(True)
    return LossInputs(logp, pad(inp.behaviour_logp), pad(inp.mask), inp.rewards, inp.group_ids,
                      pad(inp.ref_logp), pad(inp.prox_logp))


@pytest.mark.parametrize("name", ["dr_grpo", "agro", "reinforce", "cispo", "opmd"])
def test_token_sum_constant_does_not_depend_on_the_longest_response(name):
    """Dr.GRPO's constant is B * max_len (actors.max_tokens), not B * (longest response in this batch): the same
    rows padded to 3 or to 8 tokens give the same loss, and it is the masked token sum / (B * max_len)."""
    short = random_inputs(seed=40, length=3, drift=0.2)
    long = _padded_to(short, 8)
    cfg = ObjectiveConfig(name=name, max_len=8, **({"beta": 0.05} if name == "agro" else {}))
    loss3, _ = compute_loss(cfg, short)
    loss8, _ = compute_loss(cfg, long)
    assert loss3.item() == pytest.approx(loss8.item(), abs=1e-12)
    if name in {"dr_grpo", "reinforce"}:  # on-policy first step: token terms are -A * logp (u = 1)
        on = random_inputs(seed=41, length=3)
        on.behaviour_logp = on.logp.detach().clone()
        adv = loop_advantage(on.rewards, on.group_ids)
        expected = (-adv[:, None] * on.logp.detach() * on.mask).sum() / (on.logp.shape[0] * 8)
        got3, _ = compute_loss(cfg, on)
        got8, _ = compute_loss(cfg, _padded_to(on, 8))
        if name == "dr_grpo":  # PPO's surrogate value is -A * u, with u = 1
            expected = (-adv[:, None] * on.mask).sum() / (on.logp.shape[0] * 8)
        torch.testing.assert_close(got3.detach(), expected)
        torch.testing.assert_close(got8.detach(), expected)


# ---------------------------------------------------------------- gradcheck
# Only where the loss depends on logp solely through its differentiable path: objectives
# that read logp.detach() (IS weights, AGRO's regularised reward) are surrogates whose
# gradient is not the derivative of their value, and are covered by the closed forms above.


@pytest.mark.parametrize(
    "cfg",
    [
        ObjectiveConfig(name="reinforce"),
        ObjectiveConfig(name="reinforce", aggregation="seq_mean_token_mean", loo=True),
        ObjectiveConfig(name="asymre"),
        ObjectiveConfig(name="kl_pg", beta=0.2, kl_estimator="k3"),
        ObjectiveConfig(name="kl_pg", beta=0.2, kl_estimator="k2"),
    ],
    ids=lambda c: f"{c.name}-{c.aggregation}-{c.kl_estimator}",
)
def test_gradcheck(cfg):
    inp = random_inputs(seed=17, group_sizes=(3, 2), length=4)

    def f(logp):
        return compute_loss(cfg, LossInputs(logp, inp.behaviour_logp, inp.mask, inp.rewards, inp.group_ids,
                                            inp.ref_logp, inp.prox_logp))[0]

    assert torch.autograd.gradcheck(f, (inp.logp,))


# ---------------------------------------------------------------- on-policy AGRO


@pytest.mark.parametrize("loo", [False, True])
def test_agro_on_policy_gradient(loo):
    inp = random_inputs(seed=18)
    beta = 0.2
    _, g = grad_of(ObjectiveConfig(name="agro_on_policy", beta=beta, loo=loo), inp)
    d = (inp.logp.detach() - inp.ref_logp) * inp.mask
    regularised = inp.rewards - beta * d.sum(-1)
    baseline = regularised - loop_advantage(regularised, inp.group_ids, loo=loo)
    # token t is credited with the log-ratios of tokens s >= t only (causality, valid when mu = pi)
    to_go = torch.stack([d[:, t:].sum(-1) for t in range(d.shape[1])], dim=-1)
    adv = inp.rewards[:, None] - beta * to_go - baseline[:, None]
    torch.testing.assert_close(g, -adv * inp.mask / token_sum_constant(inp))


def test_agro_on_policy_equals_agro_for_single_token_generations():
    inp = random_inputs(seed=19, length=1)
    loss_a, g_a = grad_of(ObjectiveConfig(name="agro", beta=0.3), inp)
    loss_o, g_o = grad_of(ObjectiveConfig(name="agro_on_policy", beta=0.3), inp)
    torch.testing.assert_close(loss_o, loss_a)
    torch.testing.assert_close(g_o, g_a)


# ---------------------------------------------------------------- preference objectives


def pairs_by_hand(rewards, ids):
    chosen, rejected, tied = [], [], 0
    for gid in sorted(set(ids.tolist())):
        rows = [i for i in range(len(ids)) if ids[i] == gid]
        rs = [float(rewards[i]) for i in rows]
        if max(rs) == min(rs):
            tied += 1
            continue
        chosen.append(rows[rs.index(max(rs))])
        rejected.append(rows[rs.index(min(rs))])
    return chosen, rejected, tied


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_preference_gradient_and_tied_groups(name):
    inp = random_inputs(seed=32, group_sizes=(4, 3, 5, 2))
    inp.rewards[inp.group_ids == 5] = 1.0  # the last group ties: no preference, no gradient
    beta, tau = 0.5, 0.25
    cfg = ObjectiveConfig(name=name, **({"beta": beta} if name == "dpo" else {"ipo_tau": tau}))
    _, g = grad_of(cfg, inp)
    _, metrics = compute_loss(cfg, inp)
    chosen, rejected, tied = pairs_by_hand(inp.rewards, inp.group_ids)
    assert tied == 1 and metrics["tied_groups"] == 1.0 and metrics["pairs"] == len(chosen) == 3
    h = ((inp.logp.detach() - inp.ref_logp) * inp.mask).sum(-1)
    expected = torch.zeros_like(g)
    for w, l in zip(chosen, rejected):
        margin = h[w] - h[l]
        if name == "dpo":  # d/dmargin of -log sigmoid(beta margin) = -beta sigmoid(-beta margin)
            dmargin = -beta * torch.sigmoid(-beta * margin)
        else:  # d/dmargin of (margin - 1/(2 tau))^2
            dmargin = 2 * (margin - 1 / (2 * tau))
        expected[w] += dmargin * inp.mask[w] / len(chosen)
        expected[l] -= dmargin * inp.mask[l] / len(chosen)
    torch.testing.assert_close(g, expected)
    assert g[inp.group_ids == 5].abs().sum() == 0


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_preference_all_groups_tied_gives_zero_loss_with_grad(name):
    inp = random_inputs(seed=33)
    inp.rewards = torch.zeros_like(inp.rewards)
    loss, metrics = compute_loss(ObjectiveConfig(name=name, **({"beta": 0.1} if name == "dpo" else {})), inp)
    loss.backward()
    assert loss.item() == 0.0 and metrics["pairs"] == 0.0 and metrics["tied_groups"] == 3.0
    assert inp.logp.grad.abs().sum() == 0


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_preference_gradcheck(name):
    inp = random_inputs(seed=34, group_sizes=(3, 2), length=4)
    cfg = ObjectiveConfig(name=name, **({"beta": 0.5} if name == "dpo" else {}))

    def f(logp):
        return compute_loss(cfg, LossInputs(logp, inp.behaviour_logp, inp.mask, inp.rewards, inp.group_ids,
                                            inp.ref_logp, inp.prox_logp))[0]

    assert torch.autograd.gradcheck(f, (inp.logp,))
