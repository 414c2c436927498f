"""LossInputs: the per-token tensors every objective is a pure function of."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class StepContext:
    """The whole optimizer step a micro-batch belongs to, so that its loss is its exact share of the step's.

    The learner splits a step into micro-batches and sums their gradients; with these, group advantages are
    computed over the step's rewards and every denominator (rows, live sequences, DPO pairs) is the step's, so
    the summed gradient does not depend on how the rows were split."""

    rewards: Tensor  # (S,) every row of the step
    group_ids: Tensor  # (S,) long
    rows: Tensor  # (B,) long: this micro-batch's rows, as positions in the step
    n_rows: int  # S
    live_rows: int  # rows of the step with at least one response token
    pairs: int  # preference pairs (best, worst of a group with unequal rewards) in the step

    def at(self, rows: Tensor) -> "StepContext":
        return StepContext(self.rewards, self.group_ids, rows.to(self.rewards.device), self.n_rows, self.live_rows,
                           self.pairs)


@dataclass
class LossInputs:
    """One batch of B generations, padded to T tokens; groups are generations of one prompt."""

    logp: Tensor  # (B, T) current policy token log-probs, requires grad
    behaviour_logp: Tensor  # (B, T) behaviour policy mu's token log-probs, recorded by the generator
    mask: Tensor  # (B, T) float, 1.0 on response tokens, 0.0 on padding
    rewards: Tensor  # (B,)
    group_ids: Tensor  # (B,) long; equal ids are the n generations of one prompt
    ref_logp: Tensor | None = None  # (B, T) frozen reference model, only when the objective needs it
    prox_logp: Tensor | None = None  # (B, T) learner's log-probs before this update, no grad (decoupled PPO)
    step: StepContext | None = None  # the step this micro-batch is part of; None: the batch is the whole step


def check_inputs(inp: LossInputs, *, need_ref: bool, need_prox: bool, objective: str) -> None:
    """Raise ValueError naming the field when a tensor is missing or its shape disagrees."""
    if inp.logp.dim() != 2:
        raise ValueError(f"{objective}: logp must be (B, T), got shape {tuple(inp.logp.shape)}")
    batch, length = inp.logp.shape
    if need_ref and inp.ref_logp is None:
        raise ValueError(f"{objective}: needs ref_logp (the frozen reference's log-probs) but it is None")
    if need_prox and inp.prox_logp is None:
        raise ValueError(f"{objective}: needs prox_logp (the learner's pre-update log-probs) but it is None")
    token_fields = {"behaviour_logp": inp.behaviour_logp, "mask": inp.mask,
                    "ref_logp": inp.ref_logp, "prox_logp": inp.prox_logp}
    for field, tensor in token_fields.items():
        if tensor is not None and tuple(tensor.shape) != (batch, length):
            raise ValueError(f"{objective}: {field} has shape {tuple(tensor.shape)}, logp has {(batch, length)}")
    for field, tensor in {"rewards": inp.rewards, "group_ids": inp.group_ids}.items():
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"{objective}: {field} has shape {tuple(tensor.shape)}, expected ({batch},)")
    if not inp.mask.is_floating_point():
        raise ValueError(f"{objective}: mask must be a float tensor (1.0 response, 0.0 padding), got {inp.mask.dtype}")
    if inp.group_ids.is_floating_point():
        raise ValueError(f"{objective}: group_ids must be an integer tensor, got {inp.group_ids.dtype}")
    if inp.step is not None and tuple(inp.step.rows.shape) != (batch,):
        raise ValueError(f"{objective}: step.rows has shape {tuple(inp.step.rows.shape)}, expected ({batch},)")
