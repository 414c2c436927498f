"""What every weight transport is: the handle it returns, the interface it implements, what it may ask of a generator.

A transport has two sides. The learner side `publish`es a full state as a version and returns a small
`WeightHandle` at once; the generator side `apply`s a handle to a `WeightReceiver` (the generator) at its next
safe point. A version may instead be a LoRA adapter (`publish_adapter`: PEFT's tensors and config, KBs to MBs);
only transports that carry arbitrary named tensors (`carries_adapters`: object_store, disk) take one, and the
receiver serves it through its engine's LoRA support. Pull transports (object store, disk, shared slots) leave the data where a generator fetches it; push
transports (`pushes = True`: relay_cpu, nccl) apply the version in every generator inside `publish`, so they
must be `connect`ed to the generators first and the fleet cannot change afterwards.

Every hook a transport may not need (`attach`, `connect`, `close`) is a no-op here, so callers never ask which
transport they hold. This module imports nothing from the rest of Relay: concrete transports depend on it, the
registry depends on them, and nothing points back.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol

import torch

NamedTensors = Iterator[tuple[str, torch.Tensor]]

# A learner rank's way to run the copy of a version later, on its second thread: `defer(fn)` returns the
# ObjectRef of `fn()`'s result and holds the learner's next optimizer update until it is done.
Defer = Callable[[Callable[[], Any]], Any]


@dataclass(frozen=True)
class WeightHandle:
    """What a generator needs to fetch one published version."""

    version: int
    transport: str
    payload: Any  # an ObjectRef, a file path, or where a slot or push put the version
    nbytes: int
    dtypes: dict[str, str] = field(default_factory=dict)  # names stored as a stand-in dtype (bf16 as int16)
    published_at: float = 0.0
    adapter: dict | None = None  # the PEFT config (adapter_config.json) of a LoRA adapter version; None: full weights


@dataclass(frozen=True)
class TransportOptions:
    """Everything a transport may be built from; each takes what it needs (`WeightTransport.from_options`)."""

    run_dir: str = ""
    bucket_mb: float = 256.0
    timeout_s: float = 120.0
    master_address: str = "127.0.0.1"
    master_port: int = 0


class WeightReceiver(Protocol):
    """What a transport may ask of a generator, and nothing more: transports never import actors/."""

    id: str
    version: int  # the version it serves now

    def load_weights(self, version: int, named_tensors: NamedTensors) -> None:
        """Copy a whole version into the engine (whole or nothing)."""

    def load_adapter(self, version: int, named_tensors: NamedTensors, config: dict) -> None:
        """Serve a LoRA adapter (PEFT names and config) on the base model as `version`; checked whole first."""

    def weight_layout(self) -> dict:
        """Where each served parameter sits in a shared-memory slot (`transport.shared_slots.vllm_layout`)."""

    def attach_slot(self, version: int, slot: Any, layout: dict) -> None:
        """Serve `version` from the parameters' views of `slot` (a `transport.shared_slots.Slot`)."""


class WeightTransport(ABC):
    name: str  # the config name, `weights.transport`
    pushes: bool = False  # True: publish applies the version in every generator; needs connect() first
    crosses_nodes: bool = True  # False: the learner and every generator must share one host (/dev/shm)
    carries_adapters: bool = False  # True: publish_adapter works (the version is any set of named tensors)

    @classmethod
    def from_options(cls, options: TransportOptions) -> WeightTransport:
        return cls()

    # ---- learner side ----
    @abstractmethod
    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        """Hand full weights to the transport and return at once. With `defer`, a transport that copies may
        leave the copy to it (the handle then carries the ObjectRef); without it, `state` is consumed here."""

    def publish_adapter(self, version: int, tensors: dict[str, torch.Tensor], config: dict,
                        defer: Defer | None = None) -> WeightHandle:
        """Hand a LoRA adapter (PEFT's saved names, e.g. `...q_proj.lora_A.weight`, and its adapter_config.json
        as a dict) to the transport as `version`; generators serve it on their base model."""
        if not self.carries_adapters:
            raise ValueError(f"weights.transport {self.name} carries full weights only, not LoRA adapters")
        return replace(self.publish(version, tensors, defer=defer), adapter=config)

    def connect(self, peers: dict[str, Any], workers_per_generator: int = 1) -> None:
        """Push transports: join the generators ({generator_id: rollout actor or generator}) before publishing;
        each engine has `workers_per_generator` workers (its tensor-parallel size), each a receiver."""

    def close(self) -> None:
        """Free what the transport holds outside this process (files in /dev/shm, a directory of buckets)."""

    # ---- generator side ----
    def attach(self, receiver: WeightReceiver) -> None:
        """Called once when a generator starts, before any `apply`."""

    @abstractmethod
    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        """Yield (name, tensor) of the published version; raise TimeoutError naming the version if it cannot."""

    def apply(self, handle: WeightHandle, receiver: WeightReceiver, timeout_s: float) -> None:
        """Make `receiver` serve the version of `handle`: fetch the tensors and load them (whole or nothing)."""
        if handle.adapter is not None:
            receiver.load_adapter(handle.version, self.fetch(handle, timeout_s), handle.adapter)
        else:
            receiver.load_weights(handle.version, self.fetch(handle, timeout_s))

    def _handle(self, version: int, payload: Any, nbytes: int, dtypes: dict[str, str] | None = None) -> WeightHandle:
        return WeightHandle(version, self.name, payload, nbytes, dtypes or {}, time.time())
