"""Ray's shared-memory object store as the weight transport: one put per version, a zero-copy get per generator.

Weights travel as numpy arrays, so a generator's `ray.get` maps them instead of unpickling a copy. numpy has no
bfloat16: those tensors travel as their bits (int16) and the handle names them, so the generator views them back.

From a learner rank the copy into the store is deferred: the rank's second thread returns the arrays (views of
the live weights) from a Ray call, and Ray copies them into the store while the learner goes on training.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from transport.base import Defer, NamedTensors, WeightHandle, WeightTransport


def stand_in_dtypes(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The names `to_numpy` ships as another dtype, and which dtype they really are."""
    return {name: "bfloat16" for name, t in state.items() if t.dtype == torch.bfloat16}


def to_numpy(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays viewing `state` where it is on CPU and contiguous, and the stand-in dtypes."""
    arrays = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        arrays[name] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return arrays, stand_in_dtypes(state)


def from_numpy(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> NamedTensors:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zero-copy views are read-only; vLLM copies from them
        for name, a in arrays.items():
            t = torch.from_numpy(a)
            yield name, t.view(torch.bfloat16) if dtypes.get(name) == "bfloat16" else t


class ObjectStoreTransport(WeightTransport):
    name = "object_store"
    carries_adapters = True

    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        nbytes = sum(t.nbytes for t in state.values())
        if defer is not None:  # Ray copies the returned arrays, views of `state`, into the store
            return self._handle(version, defer(lambda: to_numpy(state)[0]), nbytes, stand_in_dtypes(state))
        import ray

        arrays, dtypes = to_numpy(state)
        return self._handle(version, ray.put(arrays), nbytes, dtypes)

    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            arrays = ray.get(handle.payload, timeout=timeout_s)
        except GetTimeoutError as exc:
            raise TimeoutError(f"weights version {handle.version}: object store get exceeded {timeout_s}s") from exc
        return from_numpy(arrays, handle.dtypes)
