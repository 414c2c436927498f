"""AGRO, Any-Generation Reward Optimization (Tang et al. 2025, seed 004).

Why it departs from KL-regularised policy gradient: the optimum pi* of
E_pi[r] - beta KL(pi || ref) makes R(y) = r(y) - beta log(pi(y)/ref(y)) the same for
every generation y (generation consistency). So the group variance of R is a loss
whose zero is pi* on any data, including data from a stale or foreign behaviour
policy mu, without importance weights. Its gradient, up to the factor beta, is
REINFORCE with the regularised reward and a baseline of the regularised rewards.

Default aggregation is token_sum: the per-sequence log-prob sum_t logp_t is the
quantity in the consistency condition; a per-sequence token mean would change
the fixed point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.objectives.common import adv_metrics, aggregate, group_advantage, seq_sum
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs


def _regularised_reward(cfg: ObjectiveConfig, inp: LossInputs) -> Tensor:
    """R_i = r_i - beta * sum_t (logp - ref_logp), detached; beta = 0 needs no reference."""
    if cfg.beta == 0.0:
        return inp.rewards.detach()  # (B,)
    log_ratio = seq_sum(inp.logp.detach() - inp.ref_logp, inp.mask)  # (B,)
    return inp.rewards.detach() - cfg.beta * log_ratio  # (B,)


def agro(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Off-policy AGRO, group form: loss = -(1/n) sum_i A_i sum_t logp_it, A_i = R_i - mean_j R_j.

    (1/(2n)) sum_i (R_i - mean R)^2 has gradient -beta * (1/n) sum_i A_i grad log pi(y_i)
    (the baseline term sums to zero), so this surrogate is the consistency loss's
    gradient divided by beta, with mu treated as fixed: valid for any mu. With the
    leave-one-out baseline (loo=True) the baseline no longer depends on y_i, which
    makes the estimate unbiased when mu = pi. beta = 0 is REINFORCE. Default: token_sum.
    """
    adv = group_advantage(_regularised_reward(cfg, inp), inp.group_ids, loo=cfg.loo)  # (B,)
    token_loss = -adv[:, None] * inp.logp  # (B, T)
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), adv_metrics(adv)


def agro_on_policy(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """On-policy AGRO: the consistency gradient at mu = pi, with token-level credit for the KL term.

    Derived here; the seed names an on-policy variant and a pathwise / likelihood-ratio
    gradient decomposition but not the formula used, so this is our derivation:
    1. Differentiating the variance under pi itself, (1/2) Var_{y~pi} R_pi(y), adds a
       likelihood-ratio term (1/2) E_pi[(R - V)^2 grad log pi] to the pathwise one.
       That term lowers the probability of every outlier, good or bad, and one-hot
       policies are zero-variance limit points: with exact gradients on the tabular
       check it collapses pi onto one action, often not pi*'s mode, leaving
       KL(pi, pi*)/KL(pi_0, pi*) at 0.66-1.22 (tests/test_agro_tabular.py). Not used.
    2. Kept: the pathwise gradient -beta E_pi[(R - V) grad log pi], i.e. the gradient
       of E_pi[r] - beta KL(pi || ref) (the off-policy form evaluated at mu = pi).
    3. Only because mu = pi, causality applies: the log-ratio of a token s < t is a
       function of the prefix y_<t, so E_pi[log-ratio_s * grad log pi(y_t | y_<t)] = 0
       and token t's advantage may drop it. A_it = r_i - beta sum_{s >= t}
       (logp_is - ref_is) - b_i, b_i the group (or leave-one-out) mean of the
       sequence-level R_j. Same expectation, less variance. On stale data step 3 is
       biased; use agro there.
    With T = 1 it equals agro. Default: token_sum.
    """
    regularised = _regularised_reward(cfg, inp)  # (B,)
    baseline = regularised - group_advantage(regularised, inp.group_ids, loo=cfg.loo)  # (B,)
    if cfg.beta == 0.0:
        to_go = torch.zeros_like(inp.logp)  # (B, T)
    else:
        log_ratio = (inp.logp.detach() - inp.ref_logp) * inp.mask  # (B, T)
        to_go = log_ratio.flip(-1).cumsum(-1).flip(-1)  # (B, T) sum over s >= t
    adv = inp.rewards.detach()[:, None] - cfg.beta * to_go - baseline[:, None]  # (B, T)
    token_loss = -adv * inp.logp  # (B, T)
    seq_adv = (adv * inp.mask).sum(-1) / inp.mask.sum(-1).clamp(min=1)  # (B,)
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), adv_metrics(seq_adv)
