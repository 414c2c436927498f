"""The rollout fleet: which rollout actors exist, what each is doing, and how a dead one is replaced.

A plain bookkeeping class over Ray actor handles; the launcher's event loop owns
it. Each slot's actor is `starting` (its engine is loading; a `ready` future is
pending), `idle`, `busy` (calls outstanding: up to `actors.requests_per_actor`
generation requests, queued in the actor in order, or one evaluation) or
`retiring` (scaled away: it finishes what it holds, then is killed). A failed actor is
replaced in the same slot with a fresh generator id (so its sampling seed
differs); after `max_failures` failures in a row without a success, the run
stops with an error naming the actor rather than looping. A tensor-parallel actor
runs in a placement group of its own (actors/actor.py): it is removed with the
actor, and a replacement or an added actor gets a fresh one, so its GPUs are
reserved together and freed together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import ray


class ActorFailedError(RuntimeError):
    """A rollout actor failed `max_failures` times in a row."""


@dataclass
class Slot:
    index: int
    actor: object
    generator_id: str
    state: str = "starting"  # starting | idle | busy | retiring
    calls: int = 0  # calls outstanding on the actor (generation requests or an evaluation)
    ready: object = None  # ObjectRef of the actor's first call while starting
    failures: int = 0  # consecutive
    restarts: int = 0
    requests_done: int = 0
    pid: int | None = None
    last_call: int = -1  # when it was last given a call (the fleet's call count then): ties go to the longest idle
    placement: object = None  # the actor's own placement group (tensor-parallel actors), removed with it


class RolloutFleet:
    def __init__(self, make_actor: Callable[[str, object], object], max_failures: int,
                 place: Callable[[], object] = lambda: None):
        """`make_actor(generator_id, placement)` starts an actor in `placement`, what `place()` returned: a new
        placement group per actor, or None when actors need none."""
        self._make, self.max_failures, self._place = make_actor, max_failures, place
        self.slots: dict[int, Slot] = {}
        self.events: list[dict] = []  # drained by the launcher into events.jsonl
        self._calls_given = 0

    # ---- membership ---------------------------------------------------------------------------
    def _start(self, index: int, restarts: int = 0, failures: int = 0) -> Slot:
        gid = f"gen-{index}" if restarts == 0 else f"gen-{index}.r{restarts}"
        placement = self._place()
        actor = self._make(gid, placement)
        slot = Slot(index, actor, gid, ready=actor.pid.remote(), failures=failures, restarts=restarts,
                    placement=placement)
        self.slots[index] = slot
        return slot

    def scale_to(self, n: int) -> None:
        """Start actors up to n live ones, or retire the highest-numbered down to n (a busy one finishes first)."""
        live = sorted(i for i, s in self.slots.items() if s.state != "retiring")
        first = max(self.slots, default=-1) + 1
        for index in range(first, first + n - len(live)):  # empty when scaling down
            self._start(index)
            self.events.append({"event": "actor_added", "actor": f"gen-{index}"})
        for index in reversed(live[n:]):  # empty when scaling up
            slot = self.slots[index]
            self.events.append({"event": "actor_retiring", "actor": slot.generator_id})
            if slot.state == "busy":
                slot.state = "retiring"
            else:
                self._remove(index)

    def _remove(self, index: int) -> None:
        slot = self.slots.pop(index)
        _close(slot, timeout_s=30)
        _kill(slot)
        self.events.append({"event": "actor_removed", "actor": slot.generator_id})

    # ---- lifecycle ----------------------------------------------------------------------------
    def starting_refs(self) -> dict:
        """{ObjectRef of the start-up call: slot index} of the actors still starting."""
        return {s.ready: s.index for s in self.slots.values() if s.state == "starting"}

    def on_ready(self, index: int) -> None:
        """The starting actor of `index` answered (or failed to start: raises through `ray.get`)."""
        slot = self.slots[index]
        try:
            slot.pid = ray.get(slot.ready, timeout=0)
        except ray.exceptions.RayError as exc:
            self.on_failure(index, exc)
            return
        slot.state, slot.ready = "idle", None
        self.events.append({"event": "actor_ready", "actor": slot.generator_id, "pid": slot.pid})

    def idle(self) -> list[int]:
        return sorted(i for i, s in self.slots.items() if s.state == "idle")

    def places(self, depth: int, drain_one: bool = False) -> list[int]:
        """Where generation requests can go now: each live actor once per call it can still queue (up to
        `depth`), least loaded first and, among equals, the one given a call longest ago: when admission holds
        fewer requests than the fleet could take, work still rotates over every actor (one added by launch.scale
        too) instead of always going to the lowest-numbered. `drain_one`: the first live actor gets none, so it
        becomes idle (an evaluation waits for it)."""
        live = sorted(i for i, s in self.slots.items() if s.state in ("idle", "busy"))
        slots = [self.slots[i] for i in live[1 if drain_one else 0:]]
        free = sorted((load, s.last_call, s.index) for s in slots for load in range(s.calls, depth))
        return [i for _, _, i in free]

    def on_ready_of(self, index: int, generator_id: str) -> None:
        """A start-up call answered; ignored if that actor is gone (scaled away or replaced) meanwhile."""
        if self.holds(index, generator_id) and self.slots[index].state == "starting":
            self.on_ready(index)

    def busy(self, index: int) -> object:
        slot = self.slots[index]
        slot.state, slot.calls, slot.last_call = "busy", slot.calls + 1, self._calls_given
        self._calls_given += 1
        return slot.actor

    def holds(self, index: int, generator_id: str) -> bool:
        """Whether `index` still holds the actor `generator_id` (a failed one was replaced under a new id)."""
        return index in self.slots and self.slots[index].generator_id == generator_id

    def _done(self, index: int) -> None:
        slot = self.slots[index]
        slot.calls = max(slot.calls - 1, 0)
        if slot.calls:
            return
        if slot.state == "retiring":
            self._remove(index)
        else:
            slot.state = "idle"

    def on_success(self, index: int, version: int, offered_version: int) -> None:
        """A request finished; the first one of each actor records the weights it sampled under."""
        slot = self.slots[index]
        if slot.requests_done == 0:
            self.events.append({"event": "actor_first_result", "actor": slot.generator_id, "version": version,
                                "offered_version": offered_version})
        slot.failures, slot.requests_done = 0, slot.requests_done + 1
        self._done(index)

    def offer_weights(self, handle) -> dict:
        """Hand `handle` to every live actor now (in-flight updates); returns {ObjectRef: generator id}."""
        return {s.actor.offer_weights.remote(handle): s.generator_id
                for s in self.slots.values() if s.state in ("idle", "busy")}

    def on_idle(self, index: int) -> None:
        """A call that was not a generation request (an evaluation) finished on the actor of `index`."""
        self._done(index)

    def on_failure(self, index: int, error: BaseException) -> None:
        """Replace the actor of `index` (kill it first: a stuck one must not push late results)."""
        slot = self.slots[index]
        _kill(slot)  # its placement group too: the replacement gets a fresh one
        failures = slot.failures + 1
        self.events.append({"event": "actor_failed", "actor": slot.generator_id, "failures": failures,
                            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]})
        if failures >= self.max_failures:
            raise ActorFailedError(f"rollout actor gen-{index} failed {failures} times in a row "
                                   f"(actors.max_failures={self.max_failures}); last error: {error}") from error
        if slot.state == "retiring":  # it was leaving anyway
            del self.slots[index]
            return
        new = self._start(index, restarts=slot.restarts + 1, failures=failures)
        self.events.append({"event": "actor_restarted", "actor": new.generator_id})

    def snapshot(self) -> dict:
        """What `actors.json` shows an operator (and what `launch.scale` reports)."""
        return {"pid": os.getpid(), "actors": [
            {"slot": s.index, "generator_id": s.generator_id, "state": s.state, "pid": s.pid,
             "restarts": s.restarts, "consecutive_failures": s.failures} for s in self.slots.values()]}

    def close_all(self, timeout_s: float) -> None:
        """Stop every engine cleanly (an in_flight engine is a separate process) and the actors with them."""
        for slot in list(self.slots.values()):
            _close(slot, timeout_s)
            _kill(slot)
        self.slots.clear()


def _close(slot: Slot, timeout_s: float) -> None:
    if slot.state in ("idle", "busy", "retiring"):
        try:
            ray.get(slot.actor.close.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # it is being killed either way; a dead actor has nothing left to close


def _kill(slot: Slot) -> None:
    """The actor, then its placement group (which frees the GPUs of its tensor-parallel workers)."""
    ray.kill(slot.actor, no_restart=True)
    if slot.placement is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(slot.placement)
        slot.placement = None
