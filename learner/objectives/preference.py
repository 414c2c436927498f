"""Preference losses on generated groups (seed 001): semi-online DPO and online IPO.

Rewards become preferences inside each group: chosen = highest reward, rejected =
lowest. How on-policy this is depends only on how often the generator is synced
(s = 1 on-policy, s = infinity offline DPO); that lives in the launcher, not here.
Both losses read the sequence log-ratio sum_t (logp - ref_logp), a plain token sum,
so the only aggregation is token_sum (the default) and the outer mean is over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.objectives.common import seq_sum
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs


def best_worst_pairs(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, int]:
    """Row indices of (chosen, rejected) per group, and how many groups had all-equal rewards.

    A group whose rewards are all equal (including a group of one) states no
    preference; pairing two of its generations would teach noise, so it is skipped.
    Ties for best or worst take the first row.
    """
    chosen, rejected, tied = [], [], 0
    for gid in torch.unique(group_ids):
        rows = torch.nonzero(group_ids == gid).squeeze(-1)  # (n,)
        group_rewards = rewards[rows]  # (n,)
        if group_rewards.max() == group_rewards.min():
            tied += 1
            continue
        chosen.append(rows[group_rewards.argmax()])
        rejected.append(rows[group_rewards.argmin()])
    return _as_index(chosen), _as_index(rejected), tied


def _as_index(rows: list[Tensor]) -> Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.long)  # (P,)


def _margins(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Per pair (log pi/ref)(y_w) - (log pi/ref)(y_l), with grad; and the pairing metrics."""
    chosen, rejected, tied = best_worst_pairs(inp.rewards.detach(), inp.group_ids)
    log_ratio = seq_sum(inp.logp - inp.ref_logp, inp.mask)  # (B,)
    margin = log_ratio[chosen] - log_ratio[rejected]  # (P,)
    n_groups = len(chosen) + tied
    metrics = {
        "pairs": float(len(chosen)),
        "tied_groups": float(tied),
        "tied_frac": tied / max(n_groups, 1),
        "pref_accuracy": float((margin.detach() > 0).float().mean()) if len(chosen) else 0.0,
        "margin_mean": float(margin.detach().mean()) if len(chosen) else 0.0,
        "adv_mean": float(inp.rewards[chosen].mean() - inp.rewards[rejected].mean()) if len(chosen) else 0.0,
        "adv_std": 0.0,
    }
    return margin, metrics


def _pair_mean(loss: Tensor, inp: LossInputs) -> Tensor:
    """Mean over pairs; over the step's pairs when the batch is one of its micro-batches (whole groups each)."""
    return loss.mean() if inp.step is None else loss.sum() / max(inp.step.pairs, 1)


def _no_pairs(inp: LossInputs) -> Tensor:
    """Zero loss that still belongs to the graph, so a batch of tied groups backpropagates cleanly."""
    return (inp.logp * 0.0).sum()


def dpo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Semi-online DPO: mean over pairs of -log sigmoid(beta * margin). Default: token_sum.

    adv_mean reports the mean reward gap between chosen and rejected.
    """
    margin, metrics = _margins(inp)  # (P,)
    if margin.numel() == 0:
        return _no_pairs(inp), metrics
    return _pair_mean(-F.logsigmoid(cfg.beta * margin), inp), metrics


def ipo(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Online IPO: mean over pairs of (margin - 1 / (2 tau))^2. Default: token_sum.

    The squared loss targets a finite margin, so unlike DPO it does not push the
    log-ratio gap to infinity on deterministic preferences.
    """
    margin, metrics = _margins(inp)  # (P,)
    if margin.numel() == 0:
        return _no_pairs(inp), metrics
    return _pair_mean((margin - 1.0 / (2.0 * cfg.ipo_tau)) ** 2, inp), metrics
