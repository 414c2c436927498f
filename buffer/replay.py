"""ReplayBuffer: whole groups of rollouts as Arrow record batches, with staleness admission,
a samples-per-insert limiter, bounded memory, persistence and metrics.

Plain and thread-safe (one threading.Condition): the Ray shell in buffer/actor.py runs it with
max_concurrency > 1 so a sample blocked waiting for data does not block the puts that bring it.
All waiting happens in Condition.wait, which releases the lock.
"""
from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np
import pyarrow as pa

from buffer import persist, sampler
from buffer.config import BufferConfig
from buffer.groups import GroupAssembler, GroupEntry, advantage_score, as_rollout_batch, row_bytes, split_groups
from buffer.limits import Admission, RateLimiter, RateMeter
from buffer.rollout_log import RolloutLog
from buffer.schema import RequestRows

DROP_REASONS = ("stale_at_put", "stale_at_sample", "evicted_unsampled")
FILTER_REASONS = ("zero_variance",)  # buffer.filter values that drop groups (counted as filtered_<reason>)


class ReplayBuffer:
    """The replay buffer of one run. See BufferConfig for every setting."""

    def __init__(self, cfg: BufferConfig, groups_per_step: int, run_dir: str | None = None,
                 offline_per_step: int = 0) -> None:
        if cfg.samples_per_insert is not None and 2 * cfg.spi_tolerance < groups_per_step + cfg.samples_per_insert:
            # Below this the limiter can block inserts and a full step's sample at the same time: deadlock.
            raise ValueError(
                f"buffer.spi_tolerance={cfg.spi_tolerance} too small: needs >= (groups_per_step + samples_per_insert)"
                f" / 2 = {(groups_per_step + cfg.samples_per_insert) / 2}"
            )
        if groups_per_step > cfg.capacity_groups:
            raise ValueError(f"groups_per_step={groups_per_step} exceeds buffer.capacity_groups={cfg.capacity_groups}")
        self.cfg = cfg
        if not 0 <= offline_per_step <= groups_per_step:
            raise ValueError(f"offline_per_step={offline_per_step} must be in [0, groups_per_step={groups_per_step}]")
        self.groups_per_step = groups_per_step
        self.offline_per_step = offline_per_step  # groups of each sample drawn from the offline pool (data.offline)
        self.run_dir = run_dir
        self._cond = threading.Condition()
        self._rng = np.random.default_rng(cfg.seed)
        # every stored group, for launch.export; outside _reset_state: a load does not forget the log
        self._log = RolloutLog(os.path.join(run_dir, "rollouts")) if run_dir is not None and cfg.rollout_log else None
        # data.offline's groups: apart from the online ones (no capacity, eviction, staleness or limiter), never
        # used up, and outside _reset_state: the launcher loads them at start, a resume's load keeps them
        self._offline_pool: list[pa.RecordBatch] = []
        self._reset_state()

    def _reset_state(self) -> None:
        cfg = self.cfg
        self._groups: dict[str, GroupEntry] = {}  # insertion ordered
        self._bytes = 0
        self._rows = 0
        self._assembler = GroupAssembler()
        # admission counts the online groups a step consumes: the offline share needs no generation
        online = max(self.groups_per_step - self.offline_per_step, 1)
        self._admission = Admission(cfg.max_staleness, online, cfg.staleness_policy == "admission")
        self._limiter = RateLimiter(cfg.samples_per_insert, cfg.spi_tolerance, cfg.min_size_groups)
        self._learner_version = 0
        self._checked_version = 0  # learner version the held groups were last checked for staleness at
        self._next_seq = 0
        self._requests: dict[str, dict] = {}  # request_id -> {"stored": groups, "skipped": {reason: groups}}
        self._drops: collections.Counter[str] = collections.Counter({r: 0 for r in DROP_REASONS})
        self._staleness_hist: collections.Counter[int] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()  # evicted_sampled, served_offline, ...
        self._filtered: collections.Counter[str] = collections.Counter({r: 0 for r in FILTER_REASONS})
        self._filter_checked = 0  # online groups the filter looked at (its rate's denominator)
        self._blocked = {"insert": 0.0, "sample": 0.0, "admit": 0.0}
        self._insert_rate = RateMeter(cfg.rate_window_s)
        self._sample_rate = RateMeter(cfg.rate_window_s)

    # ---- generator side -------------------------------------------------------------------------

    def try_admit(self, n_groups: int, learner_version: int) -> bool:
        """Whether a generator may start n_groups more groups now that the learner has taken `learner_version`
        steps (counts them if so); False = wait for a later version or a release."""
        return self.reserve(n_groups, learner_version) is not None

    def reserve(self, n_groups: int, learner_version: int, ahead: int = 0) -> int | None:
        """The learner version from which a generator may start n_groups more groups: `learner_version` if they
        fit now, else up to `ahead` versions later (the launcher holds that request until the learner gets
        there, so under a sync schedule the next step's admission is asked while this step trains), or None:
        wait for a later version or a release. Counted as admitted unless None. The buffer's clock moves to
        `learner_version` only: a reservation is not a step."""
        with self._cond:
            self._advance(learner_version)
            version = self._admission.reserve(n_groups, self._learner_version, ahead)
            if version is not None and version > self._learner_version:
                self._counts["reserved_ahead"] += n_groups
            return version

    def release(self, n_groups: int) -> None:
        """Give back admission slots of groups that will never arrive (actor died, prompts skipped)."""
        with self._cond:
            self._admission.release(n_groups)
            self._cond.notify_all()

    def put(self, batch: pa.RecordBatch | pa.Table | None, timeout: float | None = None,
            request_id: str | None = None, skipped: dict[str, int] | None = None) -> int:
        """Store the whole groups in batch; returns groups stored. Parts of groups wait for the rest.

        With a `request_id` the put is idempotent: a request already recorded is refused (counted as
        `duplicate_puts`, returns -1), so a generation re-issued after its actor died cannot enter twice.
        The request's outcome (groups stored, groups the generator skipped by reason) is kept for the
        run's ledger; `batch` may be None when every group of the request was skipped.
        Blocks while the samples-per-insert limiter says inserts are too far ahead; raises
        TimeoutError after timeout seconds of that. Groups `buffer.filter` drops are recorded as the
        request's `filtered` (they give their admission slot back, like groups dropped stale).
        """
        batch = as_rollout_batch(batch) if batch is not None else None  # outside the lock
        parts = split_groups(batch) if batch is not None else []
        with self._cond:
            if request_id is not None and request_id in self._requests:
                self._counts["duplicate_puts"] += 1
                return -1
            if parts and not self._wait(self._limiter.can_insert, timeout, "insert"):
                raise TimeoutError(
                    f"ReplayBuffer.put (insert side) blocked {timeout}s by the samples_per_insert limiter "
                    f"(inserts={self._limiter.inserts}, samples={self._limiter.samples}): is the learner sampling?"
                )
            filtered_before = sum(self._filtered.values())
            stored = self._add_parts(parts, offline=False, per_row=row_bytes(batch) if parts else 0.0)
            if request_id is not None:
                filtered = sum(self._filtered.values()) - filtered_before
                self._requests[request_id] = {"stored": stored, "skipped": dict(skipped or {}), "filtered": filtered}
            self._cond.notify_all()
        return stored

    def put_rows(self, rows: RequestRows | bytes, request_id: str, timeout: float | None = None) -> int:
        """`put` of one rollout request's rows (`RequestRows`, or its bytes as a rollout actor returns them and the
        launcher hands them on here by reference: the rows travel from the actor to this buffer, not through the
        launcher)."""
        rows = RequestRows.of(rows)
        if rows.judge_work:
            raise ValueError(f"request {request_id}: {len(rows.judge_work)} judge(s) have not scored its rows yet; "
                             "send it through the judge service")
        return self.put(rows.batch, timeout, request_id, rows.skipped)

    def has_request(self, request_id: str) -> bool:
        """Whether a put carrying request_id was recorded (the launcher asks before re-issuing one)."""
        with self._cond:
            return request_id in self._requests

    def ledger(self) -> dict:
        """Per-request outcomes and the ids of complete groups held now: what the run's accounting needs."""
        with self._cond:
            return {"requests": dict(self._requests), "held_group_ids": list(self._groups)}

    def load_offline(self, path: str) -> int:
        """Add rollouts from Parquet/JSONL files as offline groups (see buffer/offline.py); returns groups stored.

        Offline groups hold no admission slot, are exempt from the staleness bound and do not wait for
        the limiter (they do count as inserts for it).
        """
        from buffer.offline import read_offline

        batch = as_rollout_batch(read_offline(path))
        parts = split_groups(batch)
        with self._cond:
            stored = self._add_parts(parts, offline=True, per_row=row_bytes(batch))
            self._cond.notify_all()
        return stored

    def add_offline(self, data: pa.RecordBatch | pa.Table) -> int:
        """Add whole groups to the offline pool that `offline_per_step` of each sample come from; returns its size.

        Each group must be complete (group_size rows); launch/offline_data.py makes them so."""
        pool = []
        for group_id, part in split_groups(as_rollout_batch(data)):
            if part.num_rows != part.column("group_size")[0].as_py():
                raise ValueError(f"offline group {group_id}: {part.num_rows} rows, group_size says "
                                 f"{part.column('group_size')[0].as_py()}")
            pool.append(part)
        with self._cond:
            self._offline_pool.extend(pool)
            self._cond.notify_all()
            return len(self._offline_pool)

    def _add_parts(self, parts: list[tuple[str, pa.RecordBatch]], offline: bool, per_row: float) -> int:
        for group_id, part in parts:  # checked before anything is stored, so a bad batch changes nothing
            if group_id in self._groups:
                raise ValueError(f"group {group_id} is already complete in the buffer; got {part.num_rows} more rows")
        stored = 0
        for group_id, part in parts:
            group = self._assembler.add(group_id, part)
            if group is not None:
                stored += self._store(group_id, group, offline, round(per_row * group.num_rows))
        self._evict_to_capacity()
        return stored

    def _store(self, group_id: str, group: pa.RecordBatch, offline: bool, nbytes: int) -> int:
        version = int(min(group.column("policy_version").to_pylist()))
        if not offline and self._learner_version - version > self.cfg.max_staleness:
            self._drop_unserved(reason="stale_at_put", offline=offline)
            return 0
        if not offline and self._filters_out(group):
            return 0
        entry = GroupEntry(group_id, group, version, self._next_seq, offline, advantage_score(group), nbytes=nbytes)
        self._next_seq += 1
        self._add_entry(entry)
        if self._log is not None:
            self._log.append(group)
        self._limiter.inserts += 1
        self._insert_rate.add(1)
        return 1

    def _filters_out(self, group: pa.RecordBatch) -> bool:
        """buffer.filter (DAPO's dynamic sampling) on one complete online group; counts and releases what it drops.

        Offline groups are never filtered: they were chosen as data, and hold no admission slot to give back."""
        if self.cfg.filter == "none":
            return False
        self._filter_checked += 1
        rewards = group.column("reward").to_pylist()
        if any(r != rewards[0] for r in rewards):  # NaN != NaN: a group with a NaN reward is never "all equal"
            return False
        self._filtered[self.cfg.filter] += 1
        self._admission.release(1)  # the learner still needs a group in its place: another prompt is admitted
        return True

    def _add_entry(self, entry: GroupEntry) -> None:
        self._groups[entry.group_id] = entry
        self._bytes += entry.nbytes
        self._rows += entry.batch.num_rows

    def _remove(self, entry: GroupEntry) -> None:
        del self._groups[entry.group_id]
        self._bytes -= entry.nbytes
        self._rows -= entry.batch.num_rows

    def _drop_unserved(self, reason: str, offline: bool) -> None:
        self._drops[reason] += 1
        if not offline:
            # The learner still needs a group in its place: give the admission slot back or generation stalls.
            self._admission.release(1)

    def _evict_to_capacity(self) -> None:
        cap_bytes = self.cfg.capacity_bytes

        def over() -> bool:
            return len(self._groups) > self.cfg.capacity_groups or (cap_bytes is not None and self._bytes > cap_bytes)

        if not over():
            return
        for entry in sampler.eviction_order(list(self._groups.values()), self.cfg):
            if not over() or len(self._groups) <= 1:  # one group larger than capacity_bytes is kept rather than lost
                break
            self._remove(entry)
            if entry.times_served == 0:
                self._drop_unserved("evicted_unsampled", entry.offline)
            else:
                self._counts["evicted_sampled"] += 1

    # ---- learner side ---------------------------------------------------------------------------

    def sample(self, n_groups: int, learner_version: int, timeout: float | None = None) -> pa.RecordBatch | None:
        """n_groups whole groups as ONE record batch (rows of a group contiguous); None on timeout.

        Waits until n_groups groups are held, min_size_groups is reached and the limiter allows.
        Groups staler than max_staleness at learner_version are dropped (and counted) first.
        """
        if not 1 <= n_groups <= self.cfg.capacity_groups:
            raise ValueError(f"n_groups must be in [1, capacity_groups={self.cfg.capacity_groups}], got {n_groups}")
        n_offline = min(self.offline_per_step, n_groups)
        online = n_groups - n_offline
        with self._cond:
            if len(self._offline_pool) < n_offline:
                raise ValueError(f"the offline pool holds {len(self._offline_pool)} groups; a sample draws {n_offline}")
            self._advance(learner_version)
            if not self._wait(lambda: self._can_sample(online), timeout, "sample"):
                return None
            chosen = sampler.choose(list(self._groups.values()), online, self.cfg, self._rng) if online else []
            batches = [self._serve(entry) for entry in chosen] + self._draw_offline(n_offline)
            self._limiter.samples += online
            self._sample_rate.add(n_groups)
            self._cond.notify_all()
        return pa.concat_batches(batches)  # the one copy, outside the lock

    def _draw_offline(self, n: int) -> list[pa.RecordBatch]:
        """n distinct groups of the offline pool, uniformly (distinct: one group twice would merge into one)."""
        if not n:
            return []
        self._counts["served_offline"] += n
        return [self._offline_pool[i] for i in self._rng.choice(len(self._offline_pool), size=n, replace=False)]

    def _can_sample(self, n_groups: int) -> bool:
        if n_groups == 0:  # a purely offline batch waits for nothing
            return True
        self._drop_stale()
        size = len(self._groups)
        return size >= max(n_groups, self.cfg.min_size_groups) and self._limiter.can_sample(n_groups)

    def _drop_stale(self) -> None:
        if self._checked_version == self._learner_version:
            return  # groups are checked on arrival, so only a new learner version can make one stale
        self._checked_version = self._learner_version
        bound = self._learner_version - self.cfg.max_staleness
        for entry in [e for e in self._groups.values() if not e.offline and e.policy_version < bound]:
            self._remove(entry)
            if entry.times_served == 0:
                self._drop_unserved("stale_at_sample", offline=False)
            else:
                self._counts["expired_sampled"] += 1

    def _serve(self, entry: GroupEntry) -> pa.RecordBatch:
        entry.times_served += 1
        if entry.offline:
            self._counts["served_offline"] += 1
        else:
            self._staleness_hist[self._learner_version - entry.policy_version] += 1
        if entry.times_served >= self.cfg.max_reuse:
            self._remove(entry)
        return entry.batch

    # ---- shared ---------------------------------------------------------------------------------

    def _advance(self, learner_version: int) -> None:
        """The buffer has no clock of its own: it learns the learner's step from the calls that carry it
        (`try_admit`, `sample`) and keeps the newest, for the staleness checks of later puts."""
        if learner_version > self._learner_version:
            self._learner_version = int(learner_version)
            self._cond.notify_all()


    def _wait(self, ready, timeout: float | None, side: str) -> bool:
        """Condition.wait_for that accounts the blocked time to `side`; call with the lock held."""
        if ready():
            return True
        t0 = time.monotonic()
        ok = self._cond.wait_for(ready, timeout)
        self._blocked[side] += time.monotonic() - t0
        return ok

    def stats(self) -> dict[str, float]:
        """Flat metrics: sizes, rates, drops_<reason>, staleness_hist_<k>, blocked_s_<side>, admission."""
        with self._cond:
            out: dict[str, float] = {
                "size_groups": len(self._groups),
                "size_rollouts": self._rows,
                "bytes": self._bytes,
                "pending_groups": len(self._assembler.pending),
                "offline_pool_groups": len(self._offline_pool),
                "pending_rollouts": self._assembler.rows(),
                "inserts": self._limiter.inserts,
                "samples": self._limiter.samples,
                "inserts_per_s": self._insert_rate.rate(),
                "samples_per_s": self._sample_rate.rate(),
                "learner_version": self._learner_version,
                "admitted": self._admission.admitted,
                "released": self._admission.released,
                "admission_capacity": float(min(self._admission.capacity(self._learner_version), 1 << 53)),
            }
            out.update({f"drops_{reason}": n for reason, n in self._drops.items()})
            out.update({f"filtered_{reason}": n for reason, n in self._filtered.items()})
            out["filter_checked"] = self._filter_checked
            out["filter_rate"] = sum(self._filtered.values()) / self._filter_checked if self._filter_checked else 0.0
            out.update({name: n for name, n in self._counts.items()})
            out.update({f"blocked_s_{side}": s for side, s in self._blocked.items()})
            served = sum(self._staleness_hist.values())
            out["staleness_mean"] = sum(k * n for k, n in self._staleness_hist.items()) / served if served else 0.0
            out.update({f"staleness_hist_{k}": n for k, n in sorted(self._staleness_hist.items())})
        return {k: float(v) for k, v in out.items()}

    # ---- persistence ----------------------------------------------------------------------------

    def _default_path(self, path: str | None) -> str:
        if path is not None:
            return path
        if self.run_dir is None:
            raise ValueError("ReplayBuffer.save/load: no path given and the buffer has no run_dir")
        return os.path.join(self.run_dir, "buffer")

    def save(self, path: str | None = None) -> None:
        """Write held groups, parts of groups and counters under path (default run_dir/buffer), atomically."""
        with self._cond:
            log_segments = self._log.seal() if self._log is not None else None  # a resume rolls back the rest
            snap = persist.Snapshot(
                groups=[e.batch for e in self._groups.values()],
                meta=[persist.entry_meta(e) for e in self._groups.values()],
                pending=self._assembler.batches(),
                counters={**self._counters(), "rollout_log": log_segments},
            )
        persist.write_snapshot(self._default_path(path), snap)

    def load(self, path: str | None = None) -> None:
        """Replace this buffer's content and counters by a checkpoint; BufferCorruptError names a bad file."""
        snap = persist.read_snapshot(self._default_path(path))  # all checks before any state changes
        with self._cond:
            self._reset_state()
            for batch, meta in zip(snap.groups, snap.meta, strict=True):
                self._add_entry(persist.entry_from_meta(batch, meta))
            for part in snap.pending:
                self._assembler.add(part.column("group_id")[0].as_py(), part)
            self._restore_counters(snap.counters)
            if self._log is not None and snap.counters.get("rollout_log") is not None:
                # groups logged after this checkpoint belong to requests the restored buffer has not recorded:
                # they are generated again, so their first copies leave the log
                self._log.roll_back_to(snap.counters["rollout_log"])
            self._cond.notify_all()

    def _counters(self) -> dict:
        return {
            "learner_version": self._learner_version,
            "admitted": self._admission.admitted,
            "released": self._admission.released,
            "inserts": self._limiter.inserts,
            "samples": self._limiter.samples,
            "next_seq": self._next_seq,
            "drops": dict(self._drops),
            "filtered": dict(self._filtered),
            "filter_checked": self._filter_checked,
            "counts": dict(self._counts),
            "staleness_hist": {str(k): n for k, n in self._staleness_hist.items()},
            "requests": {k: dict(v) for k, v in self._requests.items()},
            "rng": self._rng.bit_generator.state,
        }

    def _restore_counters(self, c: dict) -> None:
        self._learner_version = int(c["learner_version"])
        self._checked_version = -1  # held groups may have gone stale since their last check
        self._admission.admitted, self._admission.released = int(c["admitted"]), int(c["released"])
        self._limiter.inserts, self._limiter.samples = int(c["inserts"]), int(c["samples"])
        self._next_seq = int(c["next_seq"])
        self._drops.update(c["drops"])
        self._filtered.update(c.get("filtered", {}))
        self._filter_checked = int(c.get("filter_checked", 0))
        self._counts.update(c["counts"])
        self._staleness_hist.update({int(k): n for k, n in c["staleness_hist"].items()})
        self._requests = {k: dict(v) for k, v in c.get("requests", {}).items()}
        if "rng" in c:  # the uniform/prioritized samplers continue the same random stream
            self._rng.bit_generator.state = c["rng"]
