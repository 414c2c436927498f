"""Trinity-RFT's off-policy REINFORCE family (seed 003): REC and OPMD.

Trinity's reading: group-relative REINFORCE is already an off-policy method once the
update is regularised; clipping and IS are two ways of regularising it, not
corrections that make it unbiased. REC therefore separates the three choices:
which tokens keep a gradient (clip mode), how kept tokens are weighted, and which
explicit regulariser is added. "old" is the behaviour policy mu.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.objectives.common import adv_metrics, aggregate, ess, masked_mean, ratio, reward_advantage
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs


def rec_keep(clip_mode: str, rho: Tensor, adv: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """Boolean (B, T): tokens that keep their gradient under the clip mode.

    one_side only blocks a token when the update would push its ratio further out
    (A > 0 above 1 + eps_high, A < 0 below 1 - eps_low); ring also lets back in the
    tokens that are far out on the side the update would pull them back from.
    """
    a = adv[:, None]  # (B, 1)
    inside = (rho >= 1.0 - cfg.eps_low) & (rho <= 1.0 + cfg.eps_high)  # (B, T)
    if clip_mode == "none":
        return torch.ones_like(rho, dtype=torch.bool)
    if clip_mode == "two_side":
        return inside
    if clip_mode == "one_side":
        return ((a >= 0) & (rho <= 1.0 + cfg.eps_high)) | ((a <= 0) & (rho >= 1.0 - cfg.eps_low))
    if clip_mode == "ring":
        far_restoring = ((a > 0) & (rho <= 1.0 - cfg.ring_eps_low)) | ((a < 0) & (rho >= 1.0 + cfg.ring_eps_high))
        return inside | far_restoring
    raise ValueError(f"unknown rec_clip {clip_mode!r}")


def rec(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """REC: -w * A * logp on the tokens the clip mode keeps, plus an optional regulariser.

    Weights: none (1), is (rho), tis (min(rho, is_cap)). Regularisers, on every
    response token: forward_kl adds -c * logp (a baseline shift towards the data);
    k2 adds c * (logp - old)^2. Rejected tokens leave the PG term's denominator.
    Default: token_sum.
    """
    adv = reward_advantage(inp, loo=cfg.loo, normalize_std=cfg.normalize_std)  # (B,)
    rho = ratio(inp.logp, inp.behaviour_logp)  # (B, T)
    keep = rec_keep(cfg.rec_clip, rho, adv, cfg).to(inp.mask.dtype)  # (B, T)
    weight = {"none": torch.ones_like(rho), "is": rho, "tis": rho.clamp(max=cfg.is_cap)}[cfg.rec_weight]  # (B, T)
    loss = aggregate(-(weight * adv[:, None]) * inp.logp, inp.mask * keep, cfg.aggregation, cfg.max_len, inp.step)
    if cfg.rec_regulariser == "forward_kl":
        loss = loss + aggregate(-cfg.rec_reg_coef * inp.logp, inp.mask, cfg.aggregation, cfg.max_len, inp.step)
    elif cfg.rec_regulariser == "k2":
        penalty = cfg.rec_reg_coef * (inp.logp - inp.behaviour_logp) ** 2  # (B, T)
        loss = loss + aggregate(penalty, inp.mask, cfg.aggregation, cfg.max_len, inp.step)
    metrics = adv_metrics(adv) | {
        "mask_frac": 1.0 - masked_mean(keep, inp.mask),
        "is_weight_ess": ess(weight * keep, inp.mask) if cfg.rec_weight != "none" else 1.0,
    }
    return loss, metrics


def opmd(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """OPMD: REINFORCE, A = r - mean r, plus a (tau / 2) * (log-ratio to the sampler)^2 proximity penalty.

    opmd_form "sequence" (default) is Kimi k1.5's: the penalty squares the sequence
    log-ratio S_i = sum_t (logp_it - old_it), so per sequence the loss is
    -A_i sum_t logp_it + (tau / 2) S_i^2 and every token's gradient is (-A_i + tau S_i).
    "token" squares each token's log-ratio instead, sum_t (tau / 2) (logp_it - old_it)^2,
    with gradient (-A_i + tau (logp_it - old_it)): it pulls each token back on its own
    rather than the whole answer. The sequence penalty is spread evenly over the
    sequence's tokens, so both aggregations divide it as they divide the REINFORCE term.
    Mirror descent's proximity term keeps the new policy near the sampler, which is
    what makes plain REINFORCE tolerate off-policy data (Trinity's reading). Default: token_sum.
    """
    adv = reward_advantage(inp, loo=cfg.loo)  # (B,)
    log_ratio = (inp.logp - inp.behaviour_logp) * inp.mask  # (B, T)
    if cfg.opmd_form == "sequence":
        n_tokens = inp.mask.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        penalty = (log_ratio.sum(dim=-1, keepdim=True) ** 2 / n_tokens).expand_as(log_ratio)  # (B, T)
    else:
        penalty = log_ratio**2  # (B, T)
    token_loss = -adv[:, None] * inp.logp + 0.5 * cfg.opmd_tau * penalty  # (B, T)
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), adv_metrics(adv)
