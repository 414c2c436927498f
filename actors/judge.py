"""A learned judge: a sequence-classification model with one output that scores samples (a reward model) or pairs
(a preference model), batched by tokens. A plain class; actors/judge_pool.py runs it in Ray actors.

What a judge reads is actors/judge_format.py's rendering through the judge's own chat template. Rows are sorted by
length and packed into forwards of at most `max_tokens_per_batch` padded tokens (right padding with the pad id:
the head reads the last token that is not padding), so a row's score does not depend on the rows it is batched
with. A forward that raises is retried row by row, so one bad row costs that row only: it scores 0 with the reason
(`reward_error:<Type>`, or `reward_nonfinite` for NaN/inf), the reasons actors/rewards.py records.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from actors.judge_format import encode, group_win_rates, pair_messages, scalar_messages, symmetric_preference
from actors.reward_config import RewardModelConfig, judge_problem, resolved_judge_dtype

Scored = tuple[float, str]  # (reward, "" or why it is 0), as actors/rewards.py's score returns
Group = tuple[list[dict], list[str]]  # (the prompt as a chat, the group's responses)


@dataclass
class JudgeWork:
    """One request's samples a named judge scores: whole groups, with where their rows sit in the request's batch."""

    model: str
    rows: list[list[int]]  # per group: its rows' indices in the request's record batch
    groups: list[Group]  # per group: the chat and the responses, in the order of `rows`


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices packed longest first into batches whose padded size (rows x longest) stays within `budget`; a
    row longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _finite(value: float) -> Scored:
    return (value, "") if math.isfinite(value) else (0.0, "reward_nonfinite")


def _rates(p: list[list[float | None]], why: dict[int, str]) -> list[Scored]:
    """group_win_rates, or, with failed pairs (None), each sample's mean over the pairs that scored."""
    n = len(p)
    if not why:
        return [(r, "") for r in group_win_rates(p)]
    out = []
    for i in range(n):
        won = [p[i][j] for j in range(n) if j != i and p[i][j] is not None]
        out.append((sum(won) / len(won), "") if won else (0.0, why[i]))
    return out


class Judge:
    """Loads `path` (AutoModelForSequenceClassification + AutoTokenizer); refuses a judge it cannot serve, naming
    `rewards.models.<name>.path`."""

    def __init__(self, cfg: RewardModelConfig, name: str, path: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        key = f"rewards.models.{name}.path"
        if problem := judge_problem(key, path):
            raise ValueError(problem)
        self.cfg, self.name, self.torch = cfg, name, torch
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, resolved_judge_dtype(cfg))).to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:  # the head finds each row's last token by the pad id: it must know it
            self.pad_id = self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = cfg.max_length or getattr(self.model.config, "max_position_embeddings", None) or 10**9
        self.truncated = 0  # inputs cut to max_length so far

    def encode(self, messages: list[dict]) -> list[int]:
        ids = encode(self.tokenizer, messages)
        if len(ids) > self.max_length:  # keep the end: the head reads the last token
            self.truncated += 1
            ids = ids[-self.max_length:]
        return ids

    def logits(self, ids: list[list[int]]) -> list[Scored]:
        """The one output per row, batched by tokens; a failing or non-finite row scores 0 with its reason."""
        out: list[Scored] = [(0.0, "")] * len(ids)
        for batch in token_batches([len(x) for x in ids], self.cfg.max_tokens_per_batch):
            try:
                values = self._forward([ids[i] for i in batch])
            except Exception:  # isolate the row that fails: the others still score
                values = None
            for k, i in enumerate(batch):
                out[i] = _finite(values[k]) if values is not None else self._alone(ids[i])
        return out

    def _alone(self, ids: list[int]) -> Scored:
        try:
            return _finite(self._forward([ids])[0])
        except Exception as exc:  # a judge that raises on a row: that row scores 0, the run goes on
            return 0.0, f"reward_error:{type(exc).__name__}"

    def _forward(self, rows: list[list[int]]) -> list[float]:
        torch = self.torch
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits  # (B, 1)
        return logits[:, 0].float().cpu().tolist()

    def score_groups(self, groups: list[Group]) -> list[list[Scored]]:
        """Each group's rewards: a reward model's (optionally normalised) score per response, or a preference
        model's win rate of each response against the rest of its group."""
        if self.cfg.kind == "preference":
            return self._win_rates(groups)
        flat = self.logits([self.encode(scalar_messages(chat, r)) for chat, responses in groups for r in responses])
        if self.cfg.normalize:
            flat = [((v - self.cfg.mean) / self.cfg.std, why) if not why else (v, why) for v, why in flat]
        it = iter(flat)
        return [[next(it) for _ in responses] for _, responses in groups]

    def _win_rates(self, groups: list[Group]) -> list[list[Scored]]:
        """P(i > j) from both orders of every pair, and each sample's mean over its pairs. A pair whose forward
        failed (raised, NaN) is left out of both samples' means; a sample left with no pair (its own text breaks
        the judge) scores 0 with the reason."""
        pairs = [(g, i, j) for g, (_, rs) in enumerate(groups) for i in range(len(rs)) for j in range(len(rs)) if i != j]
        z = self.logits([self.encode(pair_messages(groups[g][0], groups[g][1][i], groups[g][1][j])) for g, i, j in pairs])
        logit = {pair: scored for pair, scored in zip(pairs, z)}
        out = []
        for g, (_, rs) in enumerate(groups):
            n = len(rs)
            p: list[list[float | None]] = [[0.5] * n for _ in range(n)]
            why: dict[int, str] = {}
            for i in range(n):
                for j in range(i + 1, n):
                    (z_ij, why_ij), (z_ji, why_ji) = logit[(g, i, j)], logit[(g, j, i)]
                    if why_ij or why_ji:
                        p[i][j] = p[j][i] = None
                        why.setdefault(i, why_ij or why_ji), why.setdefault(j, why_ij or why_ji)
                    else:
                        p[i][j] = symmetric_preference(z_ij, z_ji)
                        p[j][i] = 1.0 - p[i][j]
            out.append(_rates(p, why))
        return out

    def pid(self) -> int:
        """The worker process id (tests kill it from outside)."""
        return os.getpid()
