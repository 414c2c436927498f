"""The one place objective names map to functions, their defaults, and the inputs they need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.objectives import agro, policy_gradient, ppo_family, preference, rec
from learner.objectives.common import shared_metrics
from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs, StepContext, check_inputs
from learner.objectives.preference import best_worst_pairs

ObjectiveFn = Callable[[ObjectiveConfig, LossInputs], tuple[Tensor, dict[str, float]]]


def _always(cfg: ObjectiveConfig) -> bool:
    return True


def _never(cfg: ObjectiveConfig) -> bool:
    return False


def _when_beta(cfg: ObjectiveConfig) -> bool:
    return cfg.beta > 0.0


@dataclass(frozen=True)
class Objective:
    """A registry entry: the pure loss function and what compute_loss must settle before calling it."""

    fn: ObjectiveFn
    aggregation: str
    """Default aggregation when the config leaves it None."""
    normalize_std: bool = False
    """Default std normalisation of the group advantage when the config leaves it None."""
    needs_reference: Callable[[ObjectiveConfig], bool] = _never
    needs_proximal: bool = False
    whole_groups: bool = False
    """A row's loss depends on the current log-probs of the other rows of its group (AGRO's regularised
    rewards, preference pairs): micro-batches must hold whole groups. Otherwise rows are split freely and the
    group statistics, functions of the rewards only, come from the whole step (LossInputs.step)."""


REGISTRY: dict[str, Objective] = {
    "reinforce": Objective(policy_gradient.reinforce, "token_sum"),
    "tis": Objective(policy_gradient.tis, "token_sum"),
    "icepop": Objective(policy_gradient.icepop, "token_sum"),
    "seq_is": Objective(policy_gradient.seq_is, "token_sum"),
    "geo_mask": Objective(policy_gradient.geo_mask, "token_sum"),
    "asymre": Objective(policy_gradient.asymre, "token_sum"),
    "kl_pg": Objective(policy_gradient.kl_pg, "token_sum", needs_reference=_always),
    "agro": Objective(agro.agro, "token_sum", needs_reference=_when_beta, whole_groups=True),
    "agro_on_policy": Objective(agro.agro_on_policy, "token_sum", needs_reference=_when_beta, whole_groups=True),
    "grpo": Objective(ppo_family.grpo, "seq_mean_token_mean", normalize_std=True, needs_reference=_when_beta),
    "dr_grpo": Objective(ppo_family.dr_grpo, "token_sum", needs_reference=_when_beta),
    "ppo": Objective(ppo_family.ppo, "seq_mean_token_mean", needs_reference=_when_beta),
    "decoupled_ppo": Objective(ppo_family.decoupled_ppo, "seq_mean_token_mean", needs_proximal=True),
    "gspo": Objective(ppo_family.gspo, "seq_mean_token_mean"),
    "cispo": Objective(ppo_family.cispo, "token_sum"),
    "rec": Objective(rec.rec, "token_sum"),
    "opmd": Objective(rec.opmd, "token_sum"),
    "dpo": Objective(preference.dpo, "token_sum", needs_reference=_always, whole_groups=True),
    "ipo": Objective(preference.ipo, "token_sum", needs_reference=_always, whole_groups=True),
}

# Every metric key compute_loss guarantees, with the value used when an objective has nothing to report.
_DEFAULT_METRICS = {"is_weight_ess": 1.0, "clip_frac": 0.0, "mask_frac": 0.0}


def _entry(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in REGISTRY:
        raise ValueError(f"objective {cfg.name!r} is not registered; known: {sorted(REGISTRY)}")
    return REGISTRY[cfg.name]


def needs_reference(cfg: ObjectiveConfig) -> bool:
    """Whether compute_loss needs ref_logp for this config."""
    return _entry(cfg).needs_reference(cfg)


def needs_proximal(cfg: ObjectiveConfig) -> bool:
    """Whether compute_loss needs prox_logp for this config."""
    return _entry(cfg).needs_proximal


def needs_whole_groups(cfg: ObjectiveConfig) -> bool:
    """Whether a micro-batch must hold whole groups for this config (see Objective.whole_groups)."""
    return _entry(cfg).whole_groups


def step_context(rewards: Tensor, group_ids: Tensor, mask: Tensor) -> StepContext:
    """The context of a step from its rewards (S,), group ids (S,) and response mask (S, T)."""
    chosen, _, _ = best_worst_pairs(rewards, group_ids)
    return StepContext(rewards, group_ids, torch.arange(len(rewards), device=rewards.device), len(rewards),
                       int((mask.sum(-1) > 0).sum()), len(chosen))


def resolve(cfg: ObjectiveConfig) -> ObjectiveConfig:
    """The config with the objective's defaults filled in where it says None."""
    entry = _entry(cfg)
    update = {}
    if cfg.aggregation is None:
        update["aggregation"] = entry.aggregation
    if cfg.normalize_std is None:
        update["normalize_std"] = entry.normalize_std
    return cfg.model_copy(update=update)


def compute_loss(cfg: ObjectiveConfig, inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """The configured objective's scalar loss on one batch, and its metrics as floats."""
    entry = _entry(cfg)
    check_inputs(inp, need_ref=entry.needs_reference(cfg), need_prox=entry.needs_proximal, objective=cfg.name)
    cfg = resolve(cfg)
    if cfg.aggregation == "token_sum" and cfg.max_len is not None and cfg.max_len < inp.logp.shape[1]:
        raise ValueError(f"{cfg.name}: max_len={cfg.max_len} is shorter than the batch's T={inp.logp.shape[1]}")
    loss, metrics = entry.fn(cfg, inp)
    metrics = _DEFAULT_METRICS | metrics | shared_metrics(inp.logp, inp.behaviour_logp, inp.mask, inp.ref_logp)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
