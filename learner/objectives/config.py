"""ObjectiveConfig: which loss the learner optimises, and every knob it reads.

One flat model rather than a discriminated union: the learner's YAML names the
objective and sets only the knobs that objective reads; the rest keep their
defaults. Knobs that would silently do nothing for the chosen objective raise
instead: READS lists, objective by objective, the knobs its function reads (taken
from the code in this package; tests/test_objectives.py checks the table against
the functions), and a knob set explicitly to a non-default value that the chosen
objective does not read is an error naming both. A default written out explicitly
(a resumed run's config.yaml holds every field) is not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ObjectiveName = Literal[
    "reinforce",
    "grpo",
    "dr_grpo",
    "ppo",
    "tis",
    "icepop",
    "seq_is",
    "geo_mask",
    "decoupled_ppo",
    "gspo",
    "cispo",
    "rec",
    "opmd",
    "asymre",
    "agro",
    "agro_on_policy",
    "kl_pg",
    "dpo",
    "ipo",
]
Aggregation = Literal["seq_mean_token_mean", "token_sum"]

# Objectives whose advantage is not a std-normalisable group advantage of raw
# rewards: normalising would change their fixed point or their definition.
_NO_STD_NORMALISATION = {"dr_grpo", "agro", "agro_on_policy", "asymre", "opmd", "dpo", "ipo"}

_AGG = frozenset({"aggregation", "max_len"})  # every objective that goes through common.aggregate
_ADV = frozenset({"loo", "normalize_std"})  # group_advantage with the configured baseline and std
_CLIP = frozenset({"eps_low", "eps_high"})
_KL = frozenset({"beta", "kl_estimator"})  # beta * kl_estimate(logp, ref_logp)
_REC = frozenset({"rec_clip", "rec_weight", "rec_regulariser", "rec_reg_coef", "ring_eps_low", "ring_eps_high"})

READS: dict[str, frozenset[str]] = {
    "reinforce": _AGG | _ADV,
    "tis": _AGG | _ADV | {"is_cap"},
    "icepop": _AGG | _ADV | {"mask_low", "mask_high"},
    "seq_is": _AGG | _ADV | {"is_cap"},
    "geo_mask": _AGG | _ADV | {"seq_low", "seq_high"},
    "asymre": _AGG | {"loo", "asymre_delta"},
    "kl_pg": _AGG | _ADV | _KL,
    "agro": _AGG | {"loo", "beta"},
    "agro_on_policy": _AGG | {"loo", "beta"},
    "grpo": _AGG | _ADV | _CLIP | _KL,  # no dual clip: grpo and dr_grpo pass None
    "dr_grpo": _AGG | _ADV | _CLIP | _KL,
    "ppo": _AGG | _ADV | _CLIP | _KL | {"dual_clip"},
    "decoupled_ppo": _AGG | _ADV | _CLIP | {"dual_clip", "is_cap"},
    "gspo": _AGG | _ADV | _CLIP,
    "cispo": _AGG | _ADV | _CLIP,
    "rec": _AGG | _ADV | _CLIP | _REC | {"is_cap"},
    "opmd": _AGG | {"loo", "opmd_tau", "opmd_form"},
    "dpo": frozenset({"beta"}),  # the sequence log-ratio is a plain token sum; aggregation is not read
    "ipo": frozenset({"ipo_tau"}),
}
"""Knobs each objective's function reads (besides `name`); any other knob set explicitly raises."""


class ObjectiveConfig(BaseModel):
    """Selects an objective from the registry and holds all of its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: ObjectiveName = "reinforce"
    """Registry name of the objective (see learner/objectives/registry.py)."""
    aggregation: Aggregation | None = None
    """How per-token terms become one scalar; None takes the objective's own default."""
    max_len: int | None = Field(default=None, gt=0)
    """token_sum divides by batch_size * max_len, a constant (Dr.GRPO). The launcher sets it to actors.max_tokens
    when left unset; None (direct calls only) falls back to T of the tensors, which depends on the batch."""

    beta: float = Field(default=0.0, ge=0.0)
    """KL strength (kl_pg; grpo, dr_grpo, ppo when > 0), AGRO regularisation, DPO inverse temperature."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL(pi || ref) estimator added to the loss by kl_pg, grpo and dr_grpo."""

    loo: bool = False
    """Leave-one-out group baseline (mean of the other generations) instead of the group mean."""
    normalize_std: bool | None = None
    """Divide the group advantage by the group's reward std; None: True for grpo only."""

    eps_low: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Lower clip range 1 - eps_low of the ratio (ppo, grpo, decoupled_ppo, gspo, cispo, rec)."""
    eps_high: float = Field(default=0.2, gt=0.0)
    """Upper clip range 1 + eps_high of the ratio (same objectives as eps_low)."""
    dual_clip: float | None = Field(default=3.0, gt=1.0)
    """Dual-clip bound c for negative advantages (ppo, decoupled_ppo); None disables it."""

    is_cap: float = Field(default=2.0, ge=1.0)
    """Truncation C of IS weights (tis, seq_is, the decoupled_ppo behaviour weight, rec tis)."""
    mask_low: float = Field(default=0.5, ge=0.0)
    """IcePop keeps a token only if its ratio is at least this."""
    mask_high: float = Field(default=2.0, gt=0.0)
    """IcePop keeps a token only if its ratio is at most this."""
    seq_low: float = Field(default=0.9, ge=0.0)
    """geo_mask drops a sequence whose geometric-mean ratio is below this."""
    seq_high: float = Field(default=1.1, gt=0.0)
    """geo_mask drops a sequence whose geometric-mean ratio is above this."""

    rec_clip: Literal["none", "one_side", "two_side", "ring"] = "one_side"
    """REC: which tokens keep a gradient, judged on the ratio to the behaviour policy."""
    rec_weight: Literal["none", "is", "tis"] = "none"
    """REC: importance weight on the kept tokens (none, the ratio, or the ratio capped at is_cap)."""
    rec_regulariser: Literal["none", "forward_kl", "k2"] = "none"
    """REC: extra term, -c * logp (forward KL, a baseline shift) or c * (logp - old)^2 (k2)."""
    rec_reg_coef: float = Field(default=0.1, ge=0.0)
    """REC: the regulariser's coefficient c."""
    ring_eps_low: float = Field(default=0.6, gt=0.0, lt=1.0)
    """REC ring: with A > 0 a token below 1 - ring_eps_low (far on the restoring side) is kept."""
    ring_eps_high: float = Field(default=2.0, gt=0.0)
    """REC ring: with A < 0 a token above 1 + ring_eps_high (far on the restoring side) is kept."""

    asymre_delta: float = -0.1
    """AsymRE baseline shift: A = r - (mean r + delta); negative favours positive samples."""
    opmd_tau: float = Field(default=1.0, ge=0.0)
    """OPMD: weight of the (tau / 2) * (log-ratio to the sampler)^2 proximity penalty."""
    opmd_form: Literal["sequence", "token"] = "sequence"
    """OPMD: square the sequence log-ratio sum_t (logp - old) (Kimi k1.5) or each token's log-ratio."""
    ipo_tau: float = Field(default=0.1, gt=0.0)
    """IPO: the target log-ratio margin is 1 / (2 * tau)."""

    @model_validator(mode="after")
    def _check_combinations(self) -> ObjectiveConfig:
        if self.mask_low > self.mask_high:
            raise ValueError(f"mask_low ({self.mask_low}) must be <= mask_high ({self.mask_high})")
        if self.seq_low > self.seq_high:
            raise ValueError(f"seq_low ({self.seq_low}) must be <= seq_high ({self.seq_high})")
        if self.name == "rec" and self.rec_clip == "ring":  # the ring lies outside the two-sided band
            if self.ring_eps_low < self.eps_low:
                raise ValueError(f"ring_eps_low ({self.ring_eps_low}) must be >= eps_low ({self.eps_low})")
            if self.ring_eps_high < self.eps_high:
                raise ValueError(f"ring_eps_high ({self.ring_eps_high}) must be >= eps_high ({self.eps_high})")
        if self.normalize_std and self.name in _NO_STD_NORMALISATION:
            raise ValueError(f"normalize_std=True is not defined for objective {self.name!r}")
        if self.name == "dpo" and self.beta <= 0.0:
            raise ValueError(f"beta must be > 0 for objective {self.name!r}")
        self._check_unread_knobs()
        return self

    def _check_unread_knobs(self) -> None:
        for knob in sorted(self.model_fields_set - {"name"} - READS[self.name]):
            if getattr(self, knob) != type(self).model_fields[knob].default:
                raise ValueError(f"{knob}={getattr(self, knob)!r} is not read by objective {self.name!r}; "
                                 f"it reads {', '.join(sorted(READS[self.name]))}")


# Objectives whose loss never reads behaviour_logp: they may train on offline rows whose behaviour policy is
# unknown (data.offline behaviour: none). Every other objective forms a ratio, clip, weight or penalty with it.
BEHAVIOUR_FREE = frozenset({"reinforce", "asymre", "kl_pg", "agro", "agro_on_policy", "dpo", "ipo"})


def reads_behaviour(cfg: ObjectiveConfig) -> bool:
    """Whether the objective's loss reads behaviour log-probs (rec only through its clip, weight or k2 penalty)."""
    if cfg.name == "rec":
        return cfg.rec_clip != "none" or cfg.rec_weight != "none" or cfg.rec_regulariser == "k2"
    return cfg.name not in BEHAVIOUR_FREE
