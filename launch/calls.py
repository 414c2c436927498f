"""Every remote call the launcher waits on, each with a deadline, behind one `ray.wait`.

The launcher never blocks on a single actor: admission, generation, the buffer's acknowledgement of a put,
learning, evaluation and actor start-up are all futures here, and the event loop handles whichever finishes
first. A call that outlives its deadline is handed back as overdue, so a stuck actor or a silent learner
becomes an error that names it instead of a hang.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray


@dataclass
class Call:
    kind: str  # admit | generate | ack | recorded | learn | ready | evaluate | offer | stats
    deadline: float  # time.monotonic() after which the call is overdue
    data: Any = None  # what the handler needs: the request, the fleet slot, ...
    since: float = 0.0


class Calls:
    def __init__(self):
        self._calls: dict[Any, Call] = {}  # ObjectRef -> Call

    def add(self, ref, kind: str, timeout_s: float, data: Any = None) -> None:
        now = time.monotonic()
        self._calls[ref] = Call(kind, now + timeout_s, data, now)

    def has(self, kind: str) -> bool:
        return any(c.kind == kind for c in self._calls.values())

    def knows(self, ref) -> bool:
        return ref in self._calls

    def wait(self, timeout_s: float) -> list[tuple[Any, Call]]:
        """Every call finished within `timeout_s` (at least one unless the time ran out), removed from here."""
        if not self._calls:
            time.sleep(timeout_s)
            return []
        refs = list(self._calls)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready and rest:  # whatever else is done by now, in one batch
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return [(ref, self._calls.pop(ref)) for ref in ready]

    def overdue(self) -> list[tuple[Any, Call]]:
        now = time.monotonic()
        late = [ref for ref, c in self._calls.items() if now > c.deadline]
        return [(ref, self._calls.pop(ref)) for ref in late]

    def settle(self, kind: str, timeout_s: float, handler) -> None:
        """Wait up to `timeout_s` for the calls of this kind and hand each that finished to `handler(ref, call)`,
        as the event loop would: for a checkpoint, which must see what they changed."""
        refs = [ref for ref, c in self._calls.items() if c.kind == kind]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        for ref in ready:
            handler(ref, self._calls.pop(ref))

    def drop(self, *kinds: str) -> None:
        """Stop waiting for calls of these kinds (their results are never read)."""
        for ref in [ref for ref, c in self._calls.items() if c.kind in kinds]:
            del self._calls[ref]
