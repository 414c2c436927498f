"""The judge service: one supervising Ray actor (asyncio) holding a pool of judge actors per named model.

A request's rows come here instead of to the buffer (`put_rows`, submitted by the launcher with the request; the
rollout actor returns its groups with the judged ones unscored and goes on sampling); it scores them on the pools,
fills the rewards into the request's record batch and puts it to the buffer under the request id, so its answer is
the request's acknowledgement exactly as the buffer's own `put_rows` would be. Evaluation calls `score` and waits.

Supervision mirrors the rollout fleet (launch/fleet.py): a judge call that fails or overruns `timeout_s` kills that
actor, starts a replacement in its slot (`<name>-<slot>.r<k>`) and scores the chunk again on whichever actor is free
next; the first attempt's result is never read, so every row gets one reward (`rows_rescored` counts the second
tries). A slot that fails `max_failures` times in a row fails the requests waiting on it, with an error naming the
actor: the launcher then re-issues them, like a lost rollout. A request id already stored, or being scored, is not
scored again. Pools resize at run time (`scale`, from `python -m launch.scale --reward-actors NAME=N`).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray

from actors.judge import Group, Judge, JudgeWork, Scored
from actors.reward_config import RewardModelConfig
from buffer.schema import RequestRows


class JudgeFailedError(RuntimeError):
    """A judge slot failed `max_failures` times in a row."""


def judge_actor_options(cfg: RewardModelConfig) -> dict:
    return dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources, max_restarts=0,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


@dataclass
class JudgeSlot:
    index: int
    actor_id: str
    actor: object
    failures: int = 0  # consecutive
    restarts: int = 0
    retiring: bool = False
    pid: int | None = None  # set once it answered: ready
    busy: bool = False  # scoring a chunk


class JudgePool:
    """One named model's judge actors. Each actor scores one chunk at a time; chunks queue for the next free one."""

    def __init__(self, name: str, cfg: RewardModelConfig, path: str, startup_timeout_s: float, events: list):
        self.name, self.cfg, self.path, self.startup_timeout_s, self.events = name, cfg, path, startup_timeout_s, events
        self.slots: dict[int, JudgeSlot] = {}
        self.free: asyncio.Queue[tuple[int, str]] = asyncio.Queue()  # (slot, actor id) ready for a chunk
        self.stats = Counter(dict.fromkeys(("rows_scored", "chunks_scored", "rows_rescored", "chunks_rescored",
                                            "actor_failures"), 0))
        self.broken: JudgeFailedError | None = None  # a slot failed max_failures times in a row: the run stops

    def _start(self, index: int, restarts: int = 0, failures: int = 0) -> None:
        actor_id = f"{self.name}-{index}" + (f".r{restarts}" if restarts else "")
        actor = ray.remote(Judge).options(**judge_actor_options(self.cfg)).remote(self.cfg, self.name, self.path)
        self.slots[index] = JudgeSlot(index, actor_id, actor, failures, restarts)
        asyncio.get_running_loop().create_task(self._await_ready(index, actor_id))

    async def _await_ready(self, index: int, actor_id: str) -> None:
        slot = self.slots[index]
        try:
            slot.pid = await asyncio.wait_for(_awaitable(slot.actor.pid.remote()), self.startup_timeout_s)
        except Exception as exc:  # the judge does not load or does not start in time: a failure of its slot
            self._failed(slot, exc)
            if self.broken:  # wake the chunks waiting for a free actor: they raise
                self.free.put_nowait((-1, ""))
            return
        self.events.append({"event": "judge_ready", "actor": actor_id})
        self.free.put_nowait((index, actor_id))

    def scale_to(self, n: int) -> None:
        live = sorted(i for i, s in self.slots.items() if not s.retiring)
        first = max(self.slots, default=-1) + 1
        for index in range(first, first + n - len(live)):
            self._start(index)
            self.events.append({"event": "judge_added", "actor": self.slots[index].actor_id})
        for index in reversed(live[n:]):  # a busy one finishes its chunk first (removed when it is taken next)
            slot = self.slots[index]
            slot.retiring = True
            self.events.append({"event": "judge_retiring", "actor": slot.actor_id})
            if slot.pid is not None and not slot.busy:  # idle: now (its queue entry is skipped as stale)
                self._remove(slot)

    def _remove(self, slot: JudgeSlot) -> None:
        del self.slots[slot.index]
        ray.kill(slot.actor, no_restart=True)
        self.events.append({"event": "judge_removed", "actor": slot.actor_id})

    def _holds(self, index: int, actor_id: str) -> bool:
        return index in self.slots and self.slots[index].actor_id == actor_id

    async def _take(self) -> JudgeSlot:
        """The next free live actor (retired or replaced ones are dropped from the queue here)."""
        while True:
            index, actor_id = await self.free.get()
            if self.broken:
                self.free.put_nowait((-1, ""))  # for the next waiter
                raise self.broken
            if not self._holds(index, actor_id):
                continue
            slot = self.slots[index]
            if slot.retiring:
                self._remove(slot)
                continue
            slot.busy = True
            return slot

    async def score(self, groups: list[Group]) -> list[list[Scored]]:
        """Each group's rewards, the groups split into about one chunk per live actor."""
        if self.broken:
            raise self.broken
        k = max(1, min(len(groups), sum(not s.retiring for s in self.slots.values())))
        bounds = [round(i * len(groups) / k) for i in range(k + 1)]
        chunks = [groups[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        out = await asyncio.gather(*(self._run_chunk(c) for c in chunks))
        return [scored for chunk in out for scored in chunk]

    async def _run_chunk(self, chunk: list[Group]) -> list[list[Scored]]:
        rows = sum(len(rs) for _, rs in chunk)
        while True:
            slot = await self._take()
            try:
                out = await asyncio.wait_for(_awaitable(slot.actor.score_groups.remote(chunk)), self.cfg.timeout_s)
            except Exception as exc:  # dead, raised, or stuck past timeout_s: replace it, score the chunk elsewhere
                self._failed(slot, exc)
                if self.broken:
                    raise self.broken
                self.stats.update(chunks_rescored=1, rows_rescored=rows)
                continue
            slot.failures, slot.busy = 0, False
            self.stats.update(chunks_scored=1, rows_scored=rows)
            self.free.put_nowait((slot.index, slot.actor_id))
            return out

    def _failed(self, slot: JudgeSlot, error: BaseException) -> None:
        """Kill the actor (a stuck one must not answer late), then start its replacement in the same slot."""
        if not self._holds(slot.index, slot.actor_id):
            return
        ray.kill(slot.actor, no_restart=True)
        failures = slot.failures + 1
        if isinstance(error, asyncio.TimeoutError):
            error = TimeoutError(f"judge {slot.actor_id}: no answer within rewards.models.{self.name}.timeout_s="
                                 f"{self.cfg.timeout_s:g}s")
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        self.events.append({"event": "judge_failed", "actor": slot.actor_id, "failures": failures, "error": message})
        self.stats.update(actor_failures=1)
        del self.slots[slot.index]
        if slot.retiring:
            return
        if failures >= self.cfg.max_failures:
            self.stats.update(slots_given_up=1)
            self.broken = JudgeFailedError(f"judge {slot.actor_id} failed {failures} times in a row (rewards.models."
                                   f"{self.name}.max_failures={self.cfg.max_failures}); last error: {message}")
            return
        self._start(slot.index, slot.restarts + 1, failures)
        self.events.append({"event": "judge_restarted", "actor": self.slots[slot.index].actor_id})

    def snapshot(self) -> list[dict]:
        return [{"actor": s.actor_id, "pid": s.pid, "restarts": s.restarts, "consecutive_failures": s.failures,
                 "retiring": s.retiring} for s in self.slots.values()]

    def close(self) -> None:
        for slot in self.slots.values():
            ray.kill(slot.actor, no_restart=True)
        self.slots.clear()


def _awaitable(ref):
    async def wait():
        return await ref
    return wait()


class JudgeService:
    """The supervising actor: pools by model name, the submission path to the buffer, counters and events."""

    def __init__(self, models: dict[str, tuple[RewardModelConfig, str]], buffer, run_dir: str | None = None,
                 startup_timeout_s: float = 900.0):
        self.models, self.buffer, self.startup_timeout_s = models, buffer, startup_timeout_s
        self.run_dir = Path(run_dir) if run_dir else None
        self.events: list[dict] = []
        self.pools: dict[str, JudgePool] = {}
        self.scoring: dict[str, asyncio.Future] = {}  # request id -> its submission under way
        self.faults, self.counts = Counter(), Counter(dict.fromkeys(("requests_scored", "rows_judged",
                                                                     "duplicates_refused"), 0))

    async def start(self) -> dict[str, int]:
        """Start every pool and wait until each has at least one judge ready; returns live actors per model."""
        for name, (cfg, path) in self.models.items():
            self.pools[name] = JudgePool(name, cfg, path, self.startup_timeout_s, self.events)
            self.pools[name].scale_to(cfg.num_actors)
        deadline = time.monotonic() + self.startup_timeout_s
        while any(p.free.empty() for p in self.pools.values()) and time.monotonic() < deadline:
            self._publish()
            await asyncio.sleep(0.05)
        self._publish()
        for pool in self.pools.values():
            if pool.broken:
                raise pool.broken
        if waiting := [n for n, p in self.pools.items() if p.free.empty()]:
            raise TimeoutError(f"judges {waiting} did not start within ray.startup_timeout_s={self.startup_timeout_s}s")
        return {n: len(p.slots) for n, p in self.pools.items()}

    async def score(self, model: str, groups: list[Group]) -> list[list[Scored]]:
        """Rewards of `groups` under judge `model`, waited for (evaluation)."""
        try:
            out = await self.pools[model].score(groups)
        finally:
            self._publish()
        self.faults.update(why for g in out for _, why in g if why)
        return out

    async def put_rows(self, rows: RequestRows | bytes, request_id: str) -> int:
        """Score the request's pending groups (`rows.judge_work`), then put its rows to the buffer under
        `request_id`: the buffer's answer (groups stored; -1 for a request already stored) is returned, as the
        buffer's own `put_rows` returns. Rows no judge scores go straight on, as they came."""
        sent, rows = rows, RequestRows.of(rows)
        if not rows.judge_work:
            return await self.buffer.put_rows.remote(sent, request_id)
        batch, work, skipped = rows.batch, rows.judge_work, rows.skipped
        if request_id in self.scoring:  # a re-issued copy while the first is being scored: that one answers
            await asyncio.shield(self.scoring[request_id])
            self.counts.update(duplicates_refused=1)
            return -1
        if await self.buffer.has_request.remote(request_id):
            self.counts.update(duplicates_refused=1)
            return -1
        future = self.scoring[request_id] = asyncio.get_running_loop().create_future()
        try:
            stored = await self._score_and_put(batch, work, request_id, skipped)
            future.set_result(stored)
            return stored
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # read here, so a future nobody else awaits does not warn
            raise
        finally:
            del self.scoring[request_id]
            self._publish()

    async def _score_and_put(self, batch, work: list[JudgeWork], request_id: str, skipped) -> int:
        scored = await asyncio.gather(*(self.pools[w.model].score(w.groups) for w in work))
        rewards, infos = batch.column("reward").to_pylist(), batch.column("reward_info").to_pylist()
        t_end = batch.column("t_end").to_pylist()
        now = time.time()
        for w, groups in zip(work, scored):
            for rows, values in zip(w.rows, groups):
                for row, (value, why) in zip(rows, values):
                    rewards[row], infos[row], t_end[row] = value, why, now
                    self.faults.update([why] if why else [])
        self.counts.update(requests_scored=1, rows_judged=sum(len(r) for w in work for r in w.rows))
        schema = batch.schema
        for name, values in (("reward", rewards), ("reward_info", infos), ("t_end", t_end)):
            i = schema.get_field_index(name)
            batch = batch.set_column(i, schema.field(i), pa.array(values, schema.field(i).type))
        return await self.buffer.put.remote(batch, None, request_id, skipped)

    async def snapshot(self) -> dict[str, list[dict]]:
        """Each pool's actors (ids, pids, restarts), as judges.json shows them."""
        return {n: p.snapshot() for n, p in self.pools.items()}

    async def scale(self, model: str, n: int) -> int:
        """Resize `model`'s pool to n actors; returns the live count asked for."""
        if model not in self.pools:
            raise KeyError(f"rewards.models has no {model!r} (has {sorted(self.pools)})")
        self.pools[model].scale_to(n)
        self._publish()
        return n

    async def stats(self) -> dict:
        """Counters per model and in all (summary.json's `judges`), and the reward faults by reason."""
        return self._stats()

    def _stats(self) -> dict:
        return {"models": {n: dict(p.stats) | {"actors": len(p.slots)} for n, p in self.pools.items()},
                **dict(self.counts), "reward_faults": dict(self.faults)}

    def _publish(self) -> None:
        """Events to <run dir>/judge_events.jsonl, the pools to judges.json (what actors.json is for rollouts)."""
        if self.run_dir is None:
            self.events.clear()
            return
        if self.events:
            with (self.run_dir / "judge_events.jsonl").open("a") as f:
                for e in self.events:
                    f.write(json.dumps({"time": round(time.time(), 3), **e}) + "\n")
            self.events.clear()
            pools = {n: p.snapshot() for n, p in self.pools.items()}
            (self.run_dir / "judges.json").write_text(json.dumps({"pools": pools, **self._stats()}))

    async def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def make_judge_service(models: dict[str, tuple[RewardModelConfig, str]], buffer, run_dir: str | None,
                       startup_timeout_s: float):
    """The service actor (it reserves no CPU: the judges do). Async, so submissions and evaluations interleave."""
    cls = ray.remote(JudgeService).options(num_cpus=0, max_restarts=0, max_concurrency=1000)
    return cls.remote(models, buffer, run_dir, startup_timeout_s)
