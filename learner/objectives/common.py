"""Pieces every objective shares: group baselines, aggregation, IS weights, KL estimators, metrics.

Everything here that produces a weight or an advantage returns it detached, so an
objective's gradient flows only through the `logp` it multiplies explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.objectives.inputs import LossInputs, StepContext

# Keeps a group of identical rewards (std 0) at advantage 0 instead of 0/0.
STD_EPS = 1e-6


def group_advantage(values: Tensor, group_ids: Tensor, *, loo: bool = False, normalize_std: bool = False) -> Tensor:
    """values - baseline within each group; the baseline is the group mean or the leave-one-out mean.

    A group of one generation has no baseline to learn from, so its advantage is 0
    under either baseline. The std is the unbiased group std, as GRPO implementations use.
    """
    values = values.detach()  # (B,)
    _, idx = torch.unique(group_ids, return_inverse=True)  # (B,)
    n_groups = int(idx.max()) + 1
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, idx, torch.ones_like(values))  # (G,)
    total = torch.zeros_like(count).index_add_(0, idx, values)  # (G,)
    mean = total / count  # (G,)
    if loo:
        others = (count[idx] - 1).clamp(min=1)  # (B,)
        baseline = torch.where(count[idx] > 1, (total[idx] - values) / others, values)  # (B,)
    else:
        baseline = mean[idx]  # (B,)
    adv = values - baseline  # (B,)
    if normalize_std:
        sq = torch.zeros_like(count).index_add_(0, idx, (values - mean[idx]) ** 2)  # (G,)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # (G,)
        adv = adv / (std[idx] + STD_EPS)
    return adv


def reward_advantage(inp: LossInputs, *, loo: bool, normalize_std: bool = False) -> Tensor:
    """group_advantage of the rewards, over the whole step when the batch is one of its micro-batches."""
    if inp.step is None:
        return group_advantage(inp.rewards, inp.group_ids, loo=loo, normalize_std=normalize_std)  # (B,)
    step = inp.step
    return group_advantage(step.rewards, step.group_ids, loo=loo, normalize_std=normalize_std)[step.rows]  # (B,)


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum over each sequence's response tokens."""
    return (x * mask).sum(dim=-1)  # (B,)


def aggregate(token_loss: Tensor, mask: Tensor, mode: str, max_len: int | None, step: StepContext | None = None) -> Tensor:
    """Reduce per-token loss terms to a scalar.

    `mask` is the effective mask: padding AND tokens an objective rejected, so a
    rejected token leaves the per-sequence denominator and a fully rejected
    sequence leaves the batch denominator. token_sum divides by the constant
    B * max_len on purpose (Dr.GRPO): the denominator must not depend on which
    tokens were kept or how long the answers are, or the fixed point moves.

    With `step` (a micro-batch of a larger step) the denominators are the step's: S * max_len for token_sum,
    the step's rows with response tokens for seq_mean_token_mean, so the micro-batches' losses sum to the
    step's. There a sequence whose every token the objective rejected adds 0 but stays in the denominator
    (which sequences are rejected is known only after every micro-batch's forward pass).
    """
    batch, length = token_loss.shape
    if mode == "token_sum":
        if step is not None and max_len is None:
            raise ValueError("token_sum over micro-batches needs max_len (the padded length differs between them)")
        constant = (batch if step is None else step.n_rows) * (max_len if max_len is not None else length)
        return (token_loss * mask).sum() / constant
    if mode == "seq_mean_token_mean":
        n_tokens = mask.sum(dim=-1)  # (B,)
        per_seq = (token_loss * mask).sum(dim=-1) / n_tokens.clamp(min=1)  # (B,)
        live = (n_tokens > 0).to(per_seq.dtype)  # (B,)
        if step is not None:
            return (per_seq * live).sum() / max(step.live_rows, 1)
        return (per_seq * live).sum() / live.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}")


def ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Detached token ratio exp(logp - old); IS weights never carry gradient."""
    return torch.exp(logp.detach() - old_logp)  # (B, T)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) on tokens sampled by the generator, with grad through logp.

    k1 = log(pi/ref); k2 = 0.5 * log(pi/ref)^2, whose gradient is log(pi/ref) * grad logp,
    the reward-shaping gradient; k3 = ref/pi - 1 - log(ref/pi), unbiased and >= 0 (GRPO).
    """
    log_ratio = logp - ref_logp  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown kl estimator {estimator!r}")


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean of x over the tokens where mask is 1, as a float (0.0 when there are none)."""
    return float((x * mask).sum() / mask.sum().clamp(min=1))


@torch.no_grad()
def ess(weights: Tensor, mask: Tensor) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) over the masked entries."""
    w = weights[mask > 0]
    sq = (w**2).sum()
    if w.numel() == 0 or sq == 0:
        return 0.0
    return float(w.sum() ** 2 / (w.numel() * sq))


@torch.no_grad()
def adv_metrics(adv: Tensor) -> dict[str, float]:
    """Mean and (population) std of the per-sequence advantages."""
    return {"adv_mean": float(adv.mean()), "adv_std": float(adv.std(correction=0))}


@torch.no_grad()
def shared_metrics(logp: Tensor, behaviour_logp: Tensor, mask: Tensor, ref_logp: Tensor | None) -> dict[str, float]:
    """Metrics every objective reports: behaviour/current mismatch and, with a reference, KL to it."""
    log_rho = logp.detach() - behaviour_logp  # (B, T)
    metrics = {"mismatch": masked_mean(torch.exp(log_rho) - 1.0 - log_rho, mask)}
    if ref_logp is not None:
        metrics["kl_to_ref"] = masked_mean(kl_estimate(logp.detach(), ref_logp, "k3"), mask)
    return metrics
