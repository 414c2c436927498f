"""Weight transports: publish a versioned set of full weights; fetch the newest on the generator side.

A publish returns a small `WeightHandle` as soon as the weights are in the
transport; the learner never waits for a generator to load them. The handle
travels with the next generation request, so a generator applies the newest
version at its next safe point and skips any it missed.

Implementations here run on CPU: the Ray object store (the default; numpy
arrays so the generator's get is zero-copy) and safetensors files in a shared
directory. A GPU transport (NCCL through vLLM's weight-transfer engine) plugs
in behind the same two methods.
"""
from __future__ import annotations

import os
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

NamedTensors = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightHandle:
    """What a generator needs to fetch one published version."""

    version: int
    transport: str
    payload: Any  # an ObjectRef, or a file path
    nbytes: int
    dtypes: dict[str, str] = field(default_factory=dict)  # names stored as a stand-in dtype (bf16 as int16)
    published_at: float = 0.0


class WeightTransport(ABC):
    name: str
    deferred = False  # True: a learner rank calls `write` on its second thread and the handle carries its result

    @abstractmethod
    def publish(self, version: int, state: dict[str, torch.Tensor]) -> WeightHandle:
        """Hand full weights to the transport and return at once."""

    @abstractmethod
    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        """Yield (name, tensor) of the published version; raise TimeoutError naming the version if it cannot."""

    def write(self, version: int, state: dict[str, torch.Tensor]) -> Any:
        """Deferred transports: consume `state` (the live weights) and return what the handle's ObjectRef holds."""
        raise RuntimeError(f"the {self.name} transport is not deferred: call publish()")

    def apply(self, handle: WeightHandle, generator, timeout_s: float) -> None:
        """Make `generator` serve the version of `handle`: fetch the tensors and load them (whole or nothing)."""
        generator.load_weights(handle.version, self.fetch(handle, timeout_s))


def to_numpy(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, dtypes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: ship the bits
            arrays[name], dtypes[name] = t.view(torch.int16).numpy(), "bfloat16"
        else:
            arrays[name] = t.numpy()
    return arrays, dtypes


def _from_numpy(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> NamedTensors:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zero-copy views are read-only; vLLM copies from them
        for name, a in arrays.items():
            t = torch.from_numpy(a)
            yield name, t.view(torch.bfloat16) if dtypes.get(name) == "bfloat16" else t


class ObjectStoreTransport(WeightTransport):
    """Ray's shared-memory object store: one put per version, a zero-copy get per generator."""

    name = "object_store"
    deferred = True  # a learner rank copies into the store on its second thread (LearnerRank.materialize)

    def write(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Arrays viewing `state`; returned from a Ray actor call, Ray copies them into the store."""
        return to_numpy(state)[0]

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> WeightHandle:
        import ray

        arrays, dtypes = to_numpy(state)
        ref = ray.put(arrays)
        nbytes = sum(a.nbytes for a in arrays.values())
        return WeightHandle(version, self.name, ref, nbytes, dtypes, time.time())

    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            arrays = ray.get(handle.payload, timeout=timeout_s)
        except GetTimeoutError as exc:
            raise TimeoutError(f"weights version {handle.version}: object store get exceeded {timeout_s}s") from exc
        return _from_numpy(arrays, handle.dtypes)


class DiskTransport(WeightTransport):
    """safetensors files in a directory every node can read; written then renamed, so never read half-written."""

    name = "disk"

    def __init__(self, directory: str, keep: int = 2):
        self.dir, self.keep = Path(directory), keep
        self.dir.mkdir(parents=True, exist_ok=True)

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> WeightHandle:
        from safetensors.torch import save_file

        path = self.dir / f"weights-v{version:08d}.safetensors"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tensors, seen = {}, set()
        for k, v in state.items():  # tied weights share storage, which safetensors refuses: copy the second name
            v = v.detach().cpu().contiguous()
            tensors[k] = v.clone() if v.data_ptr() in seen else v
            seen.add(v.data_ptr())
        save_file(tensors, str(tmp), metadata={"version": str(version)})
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("weights-v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return WeightHandle(version, self.name, str(path), sum(t.nbytes for t in tensors.values()), {}, time.time())

    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        from safetensors import safe_open

        deadline = time.monotonic() + timeout_s
        while not os.path.exists(handle.payload):  # a shared filesystem may show the file late
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {handle.version}: {handle.payload} did not appear within {timeout_s}s")
            time.sleep(0.05)
        with safe_open(handle.payload, framework="pt") as f:
            names = list(f.keys())
            tensors = [(n, f.get_tensor(n)) for n in names]
        return iter(tensors)


def make_transport(name: str, run_dir: str, bucket_mb: float = 256.0, timeout_s: float = 120.0,
                   master_address: str = "127.0.0.1", master_port: int = 0) -> WeightTransport:
    """A pull transport ready to use, or a push transport ("nccl") that still needs `connect(generators)`."""
    if name == "object_store":
        return ObjectStoreTransport()
    if name == "disk":
        return DiskTransport(os.path.join(run_dir, "weights"))
    if name == "nccl":
        from transport.nccl import NcclTransport  # raises on a machine without CUDA

        return NcclTransport(bucket_mb, timeout_s, master_address, master_port)
    if name == "shared_memory":
        from transport.shared_slots import SharedMemorySlotTransport

        return SharedMemorySlotTransport()
    if name == "relay_cpu":
        from transport.engine import SharedMemoryTransport

        return SharedMemoryTransport(bucket_mb)
    raise ValueError(f"weights.transport {name!r}: available: object_store, shared_memory, disk, nccl, relay_cpu")


PUSH_TRANSPORTS = ("nccl", "relay_cpu")  # built and connected on learner rank 0, not in the driver
