"""Accounting of a run: where every prompt group went, and the summary line."""
from __future__ import annotations

from collections import Counter


def ledger(groups_dispatched: int, requests_dispatched: int, reissued: int, unfinished: int, trained: Counter,
           buffer_ledger: dict, buffer_stats: dict, max_reuse: int) -> dict:
    """Where every prompt group went. `groups_lost` and `groups_trained_too_often` must be 0.

    Dispatched groups are skipped by a generator, dropped by the buffer (stale, evicted unsampled), filtered by
    `buffer.filter` (e.g. all rewards equal), trained on, still held by the buffer, or unfinished (in flight when
    the run ended); anything else was lost."""
    offline = {g for g in trained if g.startswith("offline:")}  # data.offline's pool: dispatched by no one, reused
    trained = Counter({g: c for g, c in trained.items() if g not in offline})
    requests = buffer_ledger["requests"]
    stored = sum(r["stored"] for r in requests.values())
    skipped = sum(sum(r["skipped"].values()) for r in requests.values())
    filtered = sum(r.get("filtered", 0) for r in requests.values())
    dropped = sum(buffer_stats.get(f"drops_{k}", 0) for k in ("stale_at_put", "stale_at_sample", "evicted_unsampled"))
    served_or_held = set(trained) | set(buffer_ledger["held_group_ids"])
    return {
        "groups_dispatched": groups_dispatched, "requests_dispatched": requests_dispatched,
        "requests_recorded": len(requests), "requests_reissued": reissued,
        "duplicate_puts_refused": int(buffer_stats.get("duplicate_puts", 0)),
        "groups_stored": stored, "groups_skipped": skipped, "groups_dropped": int(dropped),
        "groups_filtered": filtered,
        "groups_unfinished": unfinished, "groups_trained": len(trained), "offline_groups_trained": len(offline),
        "groups_held_at_end": len(buffer_ledger["held_group_ids"]),
        "groups_trained_too_often": sum(1 for c in trained.values() if c > max_reuse),
        "groups_lost": int(groups_dispatched - unfinished - skipped - dropped - filtered - len(served_or_held)),
    }


def summarize(history: list[dict], wall_s: float, final_dir: str, buffer_stats: dict, skipped: dict) -> dict:
    """The run's summary (summary.json and the final `relay: done` line); reward over the first and last fifth."""
    if not history:
        return {"steps": 0, "wall_s": round(wall_s, 1), "final_checkpoint": final_dir, "skipped": skipped,
                "buffer": {k: v for k, v in buffer_stats.items() if isinstance(v, (int, float))}}
    k = max(len(history) // 5, 1)
    first = sum(h["reward_mean"] for h in history[:k]) / k
    last = sum(h["reward_mean"] for h in history[-k:]) / k
    return {
        "steps": len(history), "wall_s": round(wall_s, 1), "reward_first": round(first, 4), "reward_last": round(last, 4),
        "staleness_max": max(h["staleness_max"] for h in history), "final_checkpoint": final_dir,
        "samples_per_s": round(sum(h["samples_per_s"] for h in history) / len(history), 1),
        "buffer": {k: v for k, v in buffer_stats.items() if isinstance(v, (int, float))}, "skipped": skipped,
    }
