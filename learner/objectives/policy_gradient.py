"""REINFORCE with a group baseline and its importance-sampling corrections for stale data.

All of these are the score-function surrogate -w * A * logp: the gradient flows only
through logp, w (an IS weight, detached) and A (a group advantage, detached) only
scale it. Default aggregation is token_sum: REINFORCE's loss is -A * sum_t logp_t,
and the constant denominator keeps long answers from being down-weighted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learner.objectives.common import (
    adv_metrics,
    aggregate,
    ess,
    reward_advantage,
    kl_estimate,
    ratio,
    seq_sum,
)
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs


def _weighted_pg(cfg: ObjectiveConfig, inp: LossInputs, adv: Tensor, weight: Tensor, keep: Tensor) -> Tensor:
    """-weight * A * logp over the kept tokens, aggregated as configured."""
    token_loss = -(weight * adv[:, None]) * inp.logp  # (B, T)
    return aggregate(token_loss, inp.mask * keep, cfg.aggregation, cfg.max_len, inp.step)


def _advantage(cfg: ObjectiveConfig, inp: LossInputs) -> Tensor:
    return reward_advantage(inp, loo=cfg.loo, normalize_std=cfg.normalize_std)  # (B,)


def reinforce(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE, A_i = r_i - mean_j r_j (or leave-one-out); unbiased only on-policy. Default: token_sum."""
    adv = _advantage(cfg, inp)  # (B,)
    ones = torch.ones_like(inp.mask)  # (B, T)
    return _weighted_pg(cfg, inp, adv, ones, ones), adv_metrics(adv)


def asymre(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """AsymRE (Trinity): REINFORCE with baseline mean r + delta; delta < 0 favours positive samples.

    The shifted baseline is a forward-KL-like regulariser that keeps off-policy REINFORCE
    from collapsing (Trinity's reading). Default: token_sum.
    """
    adv = reward_advantage(inp, loo=cfg.loo) - cfg.asymre_delta  # (B,)
    ones = torch.ones_like(inp.mask)  # (B, T)
    return _weighted_pg(cfg, inp, adv, ones, ones), adv_metrics(adv)


def kl_pg(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """KL-regularised policy gradient: -A * logp + beta * KL-estimate(pi || ref) per sampled token.

    The baseline is the raw-reward group mean, and the KL estimate is taken on the
    generator's tokens without correction: on data from mu != pi this converges to
    the wrong policy, which is the contrast AGRO's Figure 1 draws. k2 gives the
    reward-shaping gradient -(A - beta * log(pi/ref)) * grad logp. Default: token_sum.
    """
    adv = _advantage(cfg, inp)  # (B,)
    kl = kl_estimate(inp.logp, inp.ref_logp, cfg.kl_estimator)  # (B, T)
    token_loss = -adv[:, None] * inp.logp + cfg.beta * kl  # (B, T)
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), adv_metrics(adv)


def tis(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Token truncated IS: w_t = min(rho_t, C), rho_t = pi/mu (IMPALA's rho-bar). Default: token_sum.

    Truncation trades a small bias for bounded variance; with mu == pi every w_t is 1
    and this is REINFORCE exactly.
    """
    adv = _advantage(cfg, inp)  # (B,)
    rho = ratio(inp.logp, inp.behaviour_logp)  # (B, T)
    weight = rho.clamp(max=cfg.is_cap)  # (B, T)
    metrics = adv_metrics(adv) | {
        "is_weight_ess": ess(weight, inp.mask),
        "clip_frac": float(((rho > cfg.is_cap).to(inp.mask.dtype) * inp.mask).sum() / inp.mask.sum().clamp(min=1)),
    }
    return _weighted_pg(cfg, inp, adv, weight, torch.ones_like(inp.mask)), metrics


def icepop(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """IcePop: w_t = rho_t inside [mask_low, mask_high], else the token is dropped. Default: token_sum.

    Dropping rather than capping removes the tokens whose behaviour probability
    disagrees most with the learner (e.g. sampler/trainer numeric mismatch).
    """
    adv = _advantage(cfg, inp)  # (B,)
    rho = ratio(inp.logp, inp.behaviour_logp)  # (B, T)
    keep = ((rho >= cfg.mask_low) & (rho <= cfg.mask_high)).to(inp.mask.dtype)  # (B, T)
    weight = torch.where(keep > 0, rho, torch.zeros_like(rho))  # (B, T)
    metrics = adv_metrics(adv) | {
        "is_weight_ess": ess(weight, inp.mask),
        "mask_frac": 1.0 - float((keep * inp.mask).sum() / inp.mask.sum().clamp(min=1)),
    }
    return _weighted_pg(cfg, inp, adv, weight, keep), metrics


def seq_is(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Sequence-level truncated IS: w_i = min(prod_t rho_it, C), one weight per generation.

    Unbiased for the sequence-level objective up to the truncation, but the product
    explodes or vanishes on long answers; the cap bounds it. Default: token_sum.
    """
    adv = _advantage(cfg, inp)  # (B,)
    log_w = seq_sum(inp.logp.detach() - inp.behaviour_logp, inp.mask)  # (B,)
    w = torch.exp(log_w.clamp(max=math.log(cfg.is_cap)))  # (B,)
    metrics = adv_metrics(adv) | {
        "is_weight_ess": ess(w, torch.ones_like(w)),
        "clip_frac": float((log_w > math.log(cfg.is_cap)).float().mean()),
    }
    weight = w[:, None].expand_as(inp.mask)  # (B, T)
    return _weighted_pg(cfg, inp, adv, weight, torch.ones_like(inp.mask)), metrics


def geo_mask(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Geometric-mean filter: drop a generation whose exp(mean_t log rho_t) leaves [seq_low, seq_high].

    The per-token mean makes the filter length-independent, unlike the raw product;
    kept generations get no weight (REINFORCE), dropped ones leave the loss and its
    denominator. Default: token_sum.
    """
    adv = _advantage(cfg, inp)  # (B,)
    n_tokens = inp.mask.sum(dim=-1).clamp(min=1)  # (B,)
    geo = torch.exp(seq_sum(inp.logp.detach() - inp.behaviour_logp, inp.mask) / n_tokens)  # (B,)
    keep_seq = ((geo >= cfg.seq_low) & (geo <= cfg.seq_high)).to(inp.mask.dtype)  # (B,)
    keep = keep_seq[:, None].expand_as(inp.mask)  # (B, T)
    metrics = adv_metrics(adv) | {
        "is_weight_ess": ess(keep_seq, torch.ones_like(keep_seq)),
        "mask_frac": 1.0 - float(keep_seq.mean()),
    }
    return _weighted_pg(cfg, inp, adv, torch.ones_like(inp.mask), keep), metrics
