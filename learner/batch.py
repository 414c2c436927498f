"""Rollout record batches to the padded tensors the learner's forward pass and objectives need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

if TYPE_CHECKING:  # imported where used: the learner's tensor path runs without pyarrow (benchmarks/learner_memory)
    import pyarrow as pa


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    resp_index: torch.Tensor  # (B, T) position in the shifted logits that predicts response token t
    resp_mask: torch.Tensor  # (B, T) 1.0 on real response tokens
    behaviour_logp: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (B,)
    group_ids: torch.Tensor  # (B,) dense group index
    versions: torch.Tensor  # (B,) behaviour policy version: the oldest that sampled a token of the row
    token_versions: torch.Tensor  # (B, T) version that sampled each response token (0 on padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, rows: slice) -> "TrainBatch":
        return TrainBatch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def take(self, rows: torch.Tensor) -> "TrainBatch":
        """These rows, padded only to their own longest sequence and response (right padding is cut)."""
        picked = TrainBatch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))
        length = max(int(picked.attention_mask.sum(1).max()), 1) if len(rows) else 1
        width = max(int(picked.resp_mask.sum(1).max()), 1) if len(rows) else 1
        return TrainBatch(picked.input_ids[:, :length], picked.attention_mask[:, :length],
                          picked.resp_index[:, :width], picked.resp_mask[:, :width], picked.behaviour_logp[:, :width],
                          picked.rewards, picked.group_ids, picked.versions, picked.token_versions[:, :width])


def micro_batches(batch: TrainBatch, groups_per_micro: int, max_tokens: int | None, whole_groups: bool) -> list[torch.Tensor]:
    """Row indices (each (b,) long) of the micro-batches one optimizer step's rows are split into.

    max_tokens None: `groups_per_micro` groups at a time, in order. Otherwise rows (or, with `whole_groups`,
    groups) are sorted longest first and packed greedily while the micro-batch's padded size, rows x its
    longest sequence (prompt + response), stays within `max_tokens`; a unit longer than the budget gets a
    micro-batch of its own. Sorting puts rows of similar length together, so little is padding.
    """
    lengths = batch.attention_mask.sum(1)  # (B,)
    groups = [torch.nonzero(batch.group_ids == g).squeeze(-1) for g in torch.unique(batch.group_ids)]  # (n,) each
    if max_tokens is None:
        return [torch.cat(groups[i:i + groups_per_micro]) for i in range(0, len(groups), groups_per_micro)]
    units = groups if whole_groups else [torch.tensor([i]) for i in range(len(batch))]
    units.sort(key=lambda u: -int(lengths[u].max()))
    plan: list[list[torch.Tensor]] = []
    rows, longest = 0, 0
    for unit in units:
        unit_longest = int(lengths[unit].max())
        if plan and (rows + len(unit)) * max(longest, unit_longest) <= max_tokens:
            plan[-1].append(unit)
            rows, longest = rows + len(unit), max(longest, unit_longest)
        else:
            plan.append([unit])
            rows, longest = len(unit), unit_longest
    return [torch.cat(p) for p in plan]


def shard_groups(batch: pa.RecordBatch, rank: int, world_size: int) -> pa.RecordBatch:
    """This rank's whole groups: group k of the batch goes to rank k % world_size."""
    import pyarrow as pa

    group_ids = batch.column("group_id").to_pylist()
    order = {g: i for i, g in enumerate(dict.fromkeys(group_ids))}
    keep = [i for i, g in enumerate(group_ids) if order[g] % world_size == rank]
    return batch.take(pa.array(keep, pa.int64()))


def to_tensors(batch: pa.RecordBatch, pad_id: int) -> TrainBatch:
    cols = batch.to_pydict()
    token_ids, prompt_lens = cols["token_ids"], cols["prompt_len"]
    B = len(token_ids)
    L = max(len(t) for t in token_ids)
    T = max(max(len(t) - p for t, p in zip(token_ids, prompt_lens)), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    resp_index = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    resp_mask = torch.zeros((B, T))  # (B, T)
    behaviour = torch.zeros((B, T))  # (B, T)
    token_versions = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    rows = zip(token_ids, prompt_lens, cols["behaviour_logprobs"], cols["token_versions"])
    for i, (ids, p, lps, tvs) in enumerate(rows):
        n = len(ids) - p
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        # logits at position j predict token j+1, so response token t is predicted at p - 1 + t
        resp_index[i, :n] = torch.arange(p - 1, p - 1 + n)
        resp_mask[i, :n] = 1.0
        behaviour[i, :n] = torch.tensor(lps)
        if len(tvs) != n:
            raise ValueError(f"rollout {cols['rollout_id'][i]}: {len(tvs)} token versions for {n} response tokens")
        token_versions[i, :n] = torch.tensor(tvs, dtype=torch.long)
    groups = {g: k for k, g in enumerate(dict.fromkeys(cols["group_id"]))}
    return TrainBatch(
        input_ids, attention_mask, resp_index, resp_mask, behaviour,
        torch.tensor(cols["reward"], dtype=torch.float32),
        torch.tensor([groups[g] for g in cols["group_id"]], dtype=torch.long),
        torch.tensor(cols["policy_version"], dtype=torch.long), token_versions,
    )


def staleness_stats(batch: TrainBatch, learner_version: int) -> dict[str, float]:
    """How old the behaviour data is at an update by `learner_version`, measured per token.

    With in-flight weight updates one response mixes versions, so each token's staleness is
    learner_version minus the version that sampled it. `staleness_mean` averages each row's token
    mean over rows (for a row of a single version: its policy_version's staleness, the per-row metric
    this replaces); `staleness_token_mean` weights every token equally; `staleness_max` is the oldest
    token's; `behaviour_version_max` the newest token's version. A row without response tokens
    counts with its policy_version.
    """
    mask = batch.resp_mask > 0  # (B, T)
    n_tok = mask.sum(1)  # (B,)
    row_version = batch.versions[:, None].expand_as(batch.token_versions)  # (B, T)
    versions = torch.where(mask, batch.token_versions, row_version)  # (B, T)
    per_token = (learner_version - versions).double()  # (B, T)
    row_mean = torch.where(n_tok > 0, (per_token * mask).sum(1) / n_tok.clamp(min=1), per_token[:, 0])  # (B,)
    token_mean = (per_token * mask).sum() / n_tok.sum() if n_tok.sum() > 0 else row_mean.mean()
    return {
        "staleness_mean": float(row_mean.mean()), "staleness_token_mean": float(token_mean),
        "staleness_max": float(per_token.max()), "behaviour_version_max": float(versions.max()),
    }


def source_metrics(batch: pa.RecordBatch) -> dict[str, float]:
    """reward_mean/<source> and groups/<source> of a batch (ROLLOUT_SCHEMA), for every non-empty data_source."""
    import pyarrow as pa

    table = pa.Table.from_batches([batch]).group_by("data_source").aggregate(
        [("reward", "mean"), ("group_id", "count_distinct")])
    columns = (table.column(c).to_pylist() for c in ("data_source", "reward_mean", "group_id_count_distinct"))
    out = {}
    for source, mean, groups in zip(*columns):
        if source:
            out[f"reward_mean/{source}"], out[f"groups/{source}"] = float(mean), float(groups)
    return out


def response_logprobs(hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor, resp_index: torch.Tensor,
                      resp_mask: torch.Tensor, temperature: float, chunk_tokens: int, fp32_head: bool = True):
    """Log-probs (with grad) and entropies (no grad) of the response tokens under head(hidden) / temperature.

    Only the positions that predict a response token go through the head, `chunk_tokens` at a time, and each
    chunk's fp32 logits are recomputed in backward rather than kept: the full-vocabulary logits of the batch
    never exist at once, whatever the prompt length. The temperature matches the generator's, so current and
    behaviour log-probs are of the same distribution when the weights are equal. Padding entries are 0.
    fp32_head: the head's matmul itself runs in fp32 when the model is in bf16 (not a bf16 matmul cast after),
    the train/inference precision fix prime-rl and TRL ship: bf16 logits are off by ~1e-2 at a 150k vocabulary.
    """
    rows, cols = torch.nonzero(resp_mask > 0, as_tuple=True)  # (N,), (N,) one entry per response token
    pos = resp_index[rows, cols]  # (N,) hidden state at pos predicts token pos + 1
    h = hidden[rows, pos]  # (N, H)
    targets = input_ids[rows, pos + 1]  # (N,)
    # At least one chunk, even of zero tokens, so that a batch without response tokens still has a graph.
    chunk = _checkpointed if hasattr(head.weight, "ds_id") or not isinstance(head, torch.nn.Linear) else _lean
    chunks = [chunk(head, h[i:i + chunk_tokens], targets[i:i + chunk_tokens], temperature, fp32_head)
              for i in range(0, max(len(h), 1), chunk_tokens)]
    logp_flat = torch.cat([c[0] for c in chunks])  # (N,)
    entropy_flat = torch.cat([c[1] for c in chunks])  # (N,)
    zeros = torch.zeros(resp_mask.shape, dtype=torch.float32, device=hidden.device)  # (B, T)
    return zeros.index_put((rows, cols), logp_flat), zeros.index_put((rows, cols), entropy_flat)


def _lean(head: torch.nn.Linear, h: torch.Tensor, targets: torch.Tensor, temperature: float, fp32: bool):
    with_entropy = True
    return _HeadChunk.apply(h, head.weight, head.bias, targets, temperature, fp32, with_entropy)


class _HeadChunk(torch.autograd.Function):
    """Log-probs of `targets` (C,) and entropies (C,) under a linear head on h (C, H), keeping only h.

    For a full (not ZeRO-3 partitioned) head weight. Backward rebuilds the chunk's logits once and turns them in
    place into g * (onehot - softmax): three head matmuls in backward (logits, grad h, grad W) and one (C, V)
    buffer, where checkpointing the chunk would also redo the log-sum-exp and autograd's gather / logsumexp
    backward take several more (C, V) passes."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, fp32, with_entropy):
        logits = _HeadChunk.logits(h, weight, bias, temperature, fp32)  # (C, V) fp32
        top = logits.amax(-1, keepdim=True)  # (C, 1)
        unnorm = logits.sub(top).exp_()  # (C, V) one buffer for the normaliser and the entropy
        total = unnorm.sum(-1)  # (C,)
        norm = top.squeeze(-1) + total.log()  # (C,) log Z
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - norm  # (C,)
        entropy = None
        if with_entropy:
            entropy = norm - unnorm.mul_(logits).sum(-1) / total  # (C,) H = log Z - E_p[logit]
        ctx.save_for_backward(h, weight, bias, targets, norm)
        ctx.temperature, ctx.fp32 = temperature, fp32
        ctx.mark_non_differentiable(*(t for t in (entropy,) if t is not None))
        return logp, entropy

    @staticmethod
    def logits(h, weight, bias, temperature, fp32):
        dtype = torch.float32 if fp32 else weight.dtype
        x = h.to(dtype) / temperature if temperature != 1.0 else h.to(dtype)
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype)).float()

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        h, weight, bias, targets, norm = ctx.saved_tensors
        logits = _HeadChunk.logits(h, weight, bias, ctx.temperature, ctx.fp32)  # (C, V)
        grad_logits = logits.sub_(norm[:, None]).exp_().mul_(-grad[:, None])  # (C, V) -g * softmax
        grad_logits.scatter_add_(1, targets[:, None], grad[:, None])  # + g * onehot
        dtype = torch.float32 if ctx.fp32 else weight.dtype
        grad_logits = grad_logits.to(dtype)
        x = h.to(dtype) / ctx.temperature if ctx.temperature != 1.0 else h.to(dtype)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ weight.to(dtype)).div_(ctx.temperature).to(h.dtype)  # (C, H)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_logits.T @ x).to(weight.dtype)  # (V, H)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_logits.sum(0).to(bias.dtype)  # (V,)
        return grad_h, grad_w, grad_b, None, None, None, None


def _checkpointed(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float, fp32: bool):
    if not (torch.is_grad_enabled() and h.requires_grad):
        return _chunk_logprobs(head, h, targets, temperature, fp32, True)
    # Keep h only; the chunk's logits are rebuilt in backward. The entropy (no grad) is computed in the first
    # pass only: the recomputation in backward skips it.
    entropy: list[torch.Tensor] = []
    frozen_zero3 = hasattr(head.weight, "ds_id") and not head.weight.requires_grad  # LoRA under ZeRO-3

    def logp_only(h: torch.Tensor) -> torch.Tensor:
        # ZeRO-3 frees a frozen parameter after its module's forward unless a module's backward is under way,
        # which this recompute (a function's) is not: the matmul's saved weight would be empty in backward.
        # A frozen head needs no gradient, so the chunk uses a gathered copy outside ZeRO's hooks instead.
        logp, ent = _chunk_logprobs(_gathered_copy(head) if frozen_zero3 else head, h, targets, temperature, fp32,
                                    not entropy)
        entropy.append(ent)
        return logp

    logp = torch.utils.checkpoint.checkpoint(logp_only, h, use_reentrant=False)
    return logp, entropy[0]


def _gathered_copy(head: torch.nn.Linear) -> torch.nn.Linear:
    """A plain frozen Linear holding a full copy of a ZeRO-3-partitioned head's weight (every rank must call)."""
    import deepspeed

    params = [p for p in (head.weight, head.bias) if p is not None]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        weight = head.weight.detach().clone()  # (V, H)
        bias = None if head.bias is None else head.bias.detach().clone()
    plain = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    plain.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        plain.bias = torch.nn.Parameter(bias, requires_grad=False)
    return plain


def head_logits(head: torch.nn.Module, h: torch.Tensor, fp32: bool, temperature: float = 1.0) -> torch.Tensor:
    """fp32 logits / temperature (C, V) of the head on h (C, H). With fp32 and a low-precision head the matmul
    itself is fp32. The temperature divides h once it is fp32 ((h / T) W^T touches (C, H), not (C, V)).

    The head is still called as a module (its forward swapped for the call's duration), so ZeRO-3's hooks
    gather its partitioned weight and take its gradient as for any module call."""
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x if temperature == 1.0 else x / temperature

    low_precision = head.weight.dtype != torch.float32
    if not low_precision and h.dtype == torch.float32:
        return head(scaled(h))
    if not fp32 or not isinstance(head, torch.nn.Linear):
        return scaled(head(h).float())  # the matmul in the model's precision, cast after
    own = head.__dict__.get("forward")
    head.forward = lambda x: F.linear(scaled(x.float()), head.weight.float(),
                                      None if head.bias is None else head.bias.float())
    try:
        return head(h)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


class _TargetLogprob(torch.autograd.Function):
    """log softmax(logits)[target] (C,) from fp32 logits (C, V), with a lean backward.

    Autograd's logsumexp - gather chain builds its gradient in ~6 passes over (C, V) (a zero fill and scatter,
    exp, sub, div, add); the closed form g * (onehot - softmax) takes three."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        norm = torch.logsumexp(logits, dim=-1)  # (C,)
        ctx.save_for_backward(logits, targets, norm)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - norm, norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_norm):
        logits, targets, norm = ctx.saved_tensors
        grad_logits = logits.sub(norm[:, None]).exp_().mul_(-grad[:, None])  # (C, V) -g * softmax
        return grad_logits.scatter_add_(1, targets[:, None], grad[:, None]), None


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float, fp32: bool,
                    with_entropy: bool):
    logits = head_logits(head, h, fp32, temperature)  # (C, V)
    logp, norm = _TargetLogprob.apply(logits, targets)  # (C,), (C,)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        weighted = logits.sub(norm[:, None]).exp_().mul_(logits)  # (C, V) p * logit, one buffer
        entropy = norm - weighted.sum(-1)  # (C,) H = log Z - E_p[logit]
    return logp, entropy
