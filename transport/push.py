"""The trainer side of vLLM's weight-transfer engine API, shared by the push transports, with a deadline on every call.

vLLM exposes one control plane for live weight updates: `init_weight_transfer_engine`
once, then per version `start_weight_update`, `update_weights` (one call that
carries or streams every bucket) and `finish_weight_update`. The engine named in
the vLLM config moves the data: `nccl` on GPU clusters (transport/nccl.py),
`relay_cpu` on one CPU host (transport/cpu_push.py, whose worker side is
transport/cpu_engine.py), so the same call sequence runs in CPU tests.

These transports push: `publish` returns once every generator has applied the
version whole, so there is nothing left for a generator to fetch. Every call
to a generator has a deadline; a generator that does not answer produces a
`TimeoutError` naming it and the version instead of a hang.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from transport.base import NamedTensors, WeightHandle, WeightTransport


class TimedClient:
    """vLLM's trainer-side `VLLMWeightSyncClient` over named generators, each call bounded by `timeout_s`.

    A peer is a Ray actor handle whose class delegates `init_weight_transfer_engine` and
    `apply_weight_update` (or, not atomic, start/update/finish) to a `Generator`, or a local object with
    those methods (tests, single-process runs). All peers are called concurrently: NCCL needs every
    receiver inside `update_weights` while the trainer broadcasts."""

    def __init__(self, peers: dict[str, Any], timeout_s: float, workers_per_generator: int = 1, atomic: bool = True):
        if not peers:
            raise ValueError("a weight-transfer client needs at least one generator")
        self.peers, self.timeout_s, self.workers_per_generator = dict(peers), timeout_s, workers_per_generator
        # atomic: the generator runs start/update/finish in one `apply_weight_update` call (sent when the trainer
        # engine calls update_weights), so a request queued on a single-threaded actor cannot run mid-update
        self.atomic = atomic
        self.version: int | None = None  # the version being sent, for error messages and finish

    def _call(self, method: str, *args, per_peer: dict[str, tuple] | None = None) -> None:
        """Call `method` on every peer at once (with `per_peer[name]` as its arguments if given), each on a
        daemon thread (a stuck peer must neither block the caller past the deadline nor keep the process
        alive at exit); raise naming the peers that failed."""
        what = f"weights version {self.version}" if self.version is not None else "weight transfer"
        results: dict[str, BaseException | None] = {}
        threads = {name: threading.Thread(target=_run_into, daemon=True, name=f"weights-{method}-{name}",
                                          args=(results, name, getattr(peer, method), (per_peer or {}).get(name, args)))
                   for name, peer in self.peers.items()}
        for t in threads.values():
            t.start()
        deadline = time.monotonic() + self.timeout_s
        for t in threads.values():
            t.join(max(deadline - time.monotonic(), 0.0))
        for name, exc in list(results.items()):  # a late thread may still add its entry
            if exc is not None:
                raise RuntimeError(f"{what}: {method} failed on generator {name}: {exc}") from exc
        if pending := sorted(n for n, t in threads.items() if t.is_alive()):
            raise TimeoutError(f"{what}: {method} did not return within {self.timeout_s}s on generator(s) {', '.join(pending)}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """vLLM ranks a worker `rank_offset` + its rank inside its own engine, and a trainer engine sends one
        offset for a single deployment. Independent generators would all claim the same NCCL ranks, so each
        is given its own block of `workers_per_generator` ranks, in peer order."""
        if "rank_offset" not in init_info:
            return self._call("init_weight_transfer_engine", init_info)
        per_peer = {name: ({**init_info, "rank_offset": init_info["rank_offset"] + i * self.workers_per_generator},)
                    for i, name in enumerate(self.peers)}
        self._call("init_weight_transfer_engine", per_peer=per_peer)

    def start_weight_update(self) -> None:
        if not self.atomic:
            self._call("start_weight_update")

    def update_weights(self, update_info: dict | list[dict]) -> None:
        if self.atomic:
            self._call("apply_weight_update", update_info, str(self.version))
        else:
            self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        if not self.atomic:
            self._call("finish_weight_update", weight_version if weight_version is not None else str(self.version))


def _run_into(results: dict, name: str, fn, args: tuple) -> None:
    try:
        if hasattr(fn, "remote"):  # a Ray actor method: wait for its result on this thread
            import ray

            ray.get(fn.remote(*args))
        else:
            fn(*args)
        results[name] = None
    except BaseException as exc:  # reported by the caller, naming the peer
        results[name] = exc


class PushTransport(WeightTransport):
    """A transport that applies each version in every generator during `publish`."""

    pushes = True

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.client: TimedClient | None = None

    def connect(self, peers: dict[str, Any], workers_per_generator: int = 1) -> None:
        """Join every generator at once, within `timeout_s`; a generator that joins later is not reached."""
        client = TimedClient(peers, self.timeout_s, workers_per_generator)
        self._join(client)
        self.client = client

    def _join(self, client: TimedClient) -> None:
        """Set up each generator's side of the transfer engine (nothing to rendezvous by default)."""
        client.init_weight_transfer_engine({})

    def _client(self, version: int) -> TimedClient:
        if self.client is None:
            raise RuntimeError(f"weights version {version}: {self.name} transport is not connected to any generator "
                               "(call connect() with the generators first)")
        return self.client

    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        raise RuntimeError(f"weights version {handle.version}: the {self.name} transport pushes weights during publish; "
                           "a generator that did not receive it cannot fetch it later")
