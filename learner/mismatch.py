"""Train/inference mismatch: the learner's log-probs against the behaviour log-probs of the same weights.

A token sampled by version v, scored by a learner that holds v, must get the same log-prob from both sides up to
numerics (fp32 on CPU: ~1e-5; bf16 kernels on GPU: ~1e-2). A generator that silently serves other weights — an
update that never arrived, a LoRA adapter that did not load, a wrong dtype or layer layout — shows up as a gap far
above that, long before it shows in the reward, where it "masquerades as staleness". Only tokens whose recorded
version equals the learner's are compared: for older tokens the gap is the policy's own change.
"""
from __future__ import annotations

import torch


class MismatchError(RuntimeError):
    """A generator's tokens disagree with the learner's log-probs of the same weights beyond learner.mismatch_abort."""


def token_mismatch(logp: torch.Tensor, behaviour: torch.Tensor, same_version: torch.Tensor) -> torch.Tensor:
    """Per row: [sum |Δ log p|, sum k3, tokens] over the tokens in `same_version` (B, T) -> (B, 3).

    Δ = log pi - log mu; k3 = exp(Δ) - 1 - Δ >= 0, the low-variance estimate of KL(mu || pi) from mu's samples."""
    same_version = same_version & torch.isfinite(behaviour)  # offline rows may carry no behaviour log-probs
    d = torch.where(same_version, logp.detach().float() - behaviour.float(), 0.0)  # (B, T)
    k3 = torch.exp(d) - 1.0 - d  # (B, T), 0 where d is 0
    return torch.stack([d.abs().sum(1), k3.sum(1), same_version.float().sum(1)], dim=1).cpu()  # (B, 3)


def by_generator(rows: torch.Tensor, generator_ids: list[str]) -> dict[str, dict[str, float]]:
    """Rows' sums (B, 3) per generator: {generator_id: {abs_mean, k3, tokens}}, generators with tokens only."""
    sums: dict[str, torch.Tensor] = {}
    for gid, row in zip(generator_ids, rows):
        sums[gid] = sums.get(gid, torch.zeros(3, dtype=rows.dtype)) + row
    return {gid: {"abs_mean": float(s[0] / s[2]), "k3": float(s[1] / s[2]), "tokens": float(s[2])}
            for gid, s in sums.items() if s[2] > 0}


def judge(per_generator: dict[str, dict[str, float]], warn: float, abort: float | None,
          step: int) -> list[tuple[str, str]]:
    """(generator, warning) for generators past `warn` (mean |Δ log p|), worst first; raises MismatchError naming
    the worst one past `abort`."""
    bad = sorted(((m["abs_mean"], gid) for gid, m in per_generator.items() if m["abs_mean"] > warn), reverse=True)
    if bad and abort is not None and bad[0][0] > abort:
        value, gid = bad[0]
        m = per_generator[gid]
        raise MismatchError(
            f"generator {gid}: at learner step {step} its tokens' log-probs differ from the learner's for the same "
            f"weights version by {value:.4g} on average (k3 {m['k3']:.3g}, {m['tokens']:.0f} tokens), past "
            "learner.mismatch_abort={abort}: it is not serving the weights it says it serves (an update that did not "
            "load, a stale adapter, a dtype or layout mismatch)".replace("{abort}", f"{abort:g}"))
    return [(gid, f"generator {gid}: mean |Δ log p| {value:.4g} > learner.mismatch_warn={warn:g} at step {step} "
            f"({per_generator[gid]['tokens']:.0f} tokens of the learner's own version)") for value, gid in bad]
