"""Ratio-clipped objectives: PPO, GRPO, Dr.GRPO, decoupled PPO (AReaL), GSPO, CISPO.

Unlike policy_gradient.py, PPO-style surrogates differentiate through the ratio
u = exp(logp - old) itself, so the gradient of a token is -A * u * grad logp while
the clip is inactive and zero once the clip binds. "old" is the behaviour policy mu
(the sampler) everywhere except decoupled PPO, where it is the learner's own
pre-update policy and a separate weight corrects for mu.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.objectives.common import adv_metrics, aggregate, ess, kl_estimate, masked_mean, ratio, reward_advantage
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss max(-A u, -A clip(u)), dual-clipped at -c A for A < 0; and where the clip binds.

    The dual clip stops a token with a huge ratio and a negative advantage from
    contributing an unbounded loss (a stale sample the policy now strongly prefers).
    """
    u = torch.exp(logp - old_logp)  # (B, T)
    a = adv[:, None]  # (B, 1)
    unclipped = -a * u  # (B, T)
    clipped = -a * u.clamp(1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    binds = clipped > unclipped  # (B, T)
    if dual_clip is not None:
        floor = (-dual_clip * a).expand_as(loss)  # (B, T)
        dual = (a < 0) & (loss > floor)  # (B, T)
        loss = torch.where(dual, floor, loss)
        binds = binds | dual
    return loss, binds


def _frac(flags: Tensor, mask: Tensor) -> float:
    return masked_mean(flags.to(mask.dtype), mask)


def _ppo(cfg: ObjectiveConfig, inp: LossInputs, adv: Tensor, dual_clip: float | None) -> tuple[Tensor, dict]:
    token_loss, binds = clipped_surrogate(inp.logp, inp.behaviour_logp, adv, cfg.eps_low, cfg.eps_high, dual_clip)
    if cfg.beta > 0.0:
        token_loss = token_loss + cfg.beta * kl_estimate(inp.logp, inp.ref_logp, cfg.kl_estimator)  # (B, T)
    metrics = adv_metrics(adv) | {
        "clip_frac": _frac(binds, inp.mask),
        "is_weight_ess": ess(ratio(inp.logp, inp.behaviour_logp), inp.mask),
    }
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), metrics


def _advantage(cfg: ObjectiveConfig, inp: LossInputs) -> Tensor:
    return reward_advantage(inp, loo=cfg.loo, normalize_std=cfg.normalize_std)  # (B,)


def ppo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip with dual clip, old = behaviour, group-baseline advantage. Default: seq_mean_token_mean.

    Treats the sampler as the trust-region anchor, so with stale data the clip both
    bounds the update and (badly) stands in for off-policy correction: AReaL reports
    it collapsing at 4 versions of staleness; decoupled_ppo separates the two jobs.
    """
    return _ppo(cfg, inp, _advantage(cfg, inp), cfg.dual_clip)


def grpo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """GRPO (DeepSeekMath): std-normalised group advantage, PPO clip (no dual clip), beta * KL(k3) to ref.

    Default: seq_mean_token_mean as published, which favours short correct answers
    and long wrong ones; dr_grpo is the unbiased fix.
    """
    return _ppo(cfg, inp, _advantage(cfg, inp), None)


def dr_grpo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Dr.GRPO: GRPO without the std division and with token_sum over a constant. Default: token_sum.

    Both changes remove a bias: the std reweights prompts by difficulty, the
    per-sequence mean reweights answers by length.
    """
    return _ppo(cfg, inp, _advantage(cfg, inp), None)


def decoupled_ppo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Decoupled PPO (AReaL): w_t * PPO(logp, old = prox), w_t = min(prox/mu, is_cap). Default: seq_mean_token_mean.

    The clip is taken around the learner's own recent policy, so it bounds the update
    size whatever the data's age; the behaviour weight alone corrects the staleness.
    With prox == mu the weight is 1 and this is PPO exactly.
    """
    adv = _advantage(cfg, inp)  # (B,)
    token_loss, binds = clipped_surrogate(inp.logp, inp.prox_logp, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
    behaviour_w = torch.exp(inp.prox_logp - inp.behaviour_logp).clamp(max=cfg.is_cap)  # (B, T)
    metrics = adv_metrics(adv) | {
        "clip_frac": _frac(binds, inp.mask),
        "is_weight_ess": ess(behaviour_w, inp.mask),
    }
    return aggregate(behaviour_w * token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), metrics


def gspo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """GSPO: one sequence ratio s_i = exp(mean_t (logp - old)), clipped per sequence. Default: seq_mean_token_mean.

    The length-normalised sequence ratio matches the sequence-level reward and avoids
    token-ratio noise; the paper clips it tightly (eps_low 3e-4, eps_high 4e-4: set them).
    The sequence's loss is placed on every one of its tokens, so seq_mean_token_mean
    gives mean_i L_i exactly.
    """
    adv = _advantage(cfg, inp)  # (B,)
    n_tokens = inp.mask.sum(dim=-1).clamp(min=1)  # (B,)
    log_s = ((inp.logp - inp.behaviour_logp) * inp.mask).sum(dim=-1) / n_tokens  # (B,)
    seq_loss, binds = clipped_surrogate(log_s[:, None], torch.zeros_like(log_s[:, None]), adv,
                                        cfg.eps_low, cfg.eps_high, None)  # (B, 1)
    token_loss = seq_loss.expand_as(inp.mask)  # (B, T)
    metrics = adv_metrics(adv) | {
        "clip_frac": float(binds.to(inp.mask.dtype).mean()),
        "is_weight_ess": ess(torch.exp(log_s.detach()), torch.ones_like(log_s)),
    }
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), metrics


def cispo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1): -sg(clip(rho, 1 - eps_low, 1 + eps_high)) * A * logp. Default: token_sum.

    Clipping the weight instead of the surrogate keeps every token's gradient, so
    rare high-ratio tokens (often the reasoning forks) still learn, with bounded scale.
    """
    adv = _advantage(cfg, inp)  # (B,)
    rho = ratio(inp.logp, inp.behaviour_logp)  # (B, T)
    weight = rho.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)  # (B, T)
    token_loss = -(weight * adv[:, None]) * inp.logp  # (B, T)
    metrics = adv_metrics(adv) | {
        "clip_frac": _frac(weight != rho, inp.mask),
        "is_weight_ess": ess(weight, inp.mask),
    }
    return aggregate(token_loss, inp.mask, cfg.aggregation, cfg.max_len, inp.step), metrics
