"""Which groups are served, and which leave when the buffer is full. Pure functions of the entries."""
from __future__ import annotations

import numpy as np

from buffer.config import BufferConfig
from buffer.groups import GroupEntry


def choose(entries: list[GroupEntry], n_groups: int, cfg: BufferConfig, rng: np.random.Generator) -> list[GroupEntry]:
    """n distinct groups (the caller checked len(entries) >= n), in the order they are served.

    fifo: oldest behaviour version first, then arrival order; every held group is served once before any
    is served again (with max_reuse > 1 this is a queue that re-enters served groups at its back). Ordering
    by version first matters with several rollout actors: groups arrive out of admission order, and serving
    the stalest first keeps them inside the staleness bound instead of dropping them.
    uniform: every held group equally likely. prioritized: p_i ~ (score_i + eps)^alpha.
    """
    if cfg.sampler == "fifo":
        return sorted(entries, key=lambda e: (e.times_served, e.policy_version, e.seq))[:n_groups]
    if cfg.sampler == "uniform":
        idx = rng.choice(len(entries), size=n_groups, replace=False)
        return [entries[i] for i in idx]
    weights = priorities(entries, cfg)
    idx = rng.choice(len(entries), size=n_groups, replace=False, p=weights / weights.sum())
    return [entries[i] for i in idx]


def priorities(entries: list[GroupEntry], cfg: BufferConfig) -> np.ndarray:
    """Unnormalised sampling weights, (len(entries),)."""
    if cfg.priority == "recency":
        # Rank by arrival, newest = len(entries): scale-free, unlike raw seq numbers that grow all run.
        order = np.argsort([e.seq for e in entries], kind="stable")
        score = np.empty(len(entries), dtype=np.float64)
        score[order] = np.arange(1, len(entries) + 1, dtype=np.float64)
    else:
        score = np.array([e.score for e in entries], dtype=np.float64)
    return (score + cfg.priority_eps) ** cfg.priority_exponent


def eviction_order(entries: list[GroupEntry], cfg: BufferConfig) -> list[GroupEntry]:
    """The groups in the order they are evicted: first inserted, or oldest behaviour version (ties: first inserted).
    Sorted once per put that overflows, not searched once per evicted group: a full buffer of 4,096 groups took
    10 ms a put that way (16 groups each). Entries arrive in insertion order, which the sort then only checks."""
    if cfg.eviction == "fifo":
        return sorted(entries, key=lambda e: e.seq)
    return sorted(entries, key=lambda e: (e.policy_version, e.seq))
