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
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len), adv_metrics(adv)
