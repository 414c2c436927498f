"""NCCL weight broadcast for GPU clusters, through vLLM's weight-transfer engine API.

The learner's rank 0 joins one NCCL group with every generator's vLLM workers
(`init_weight_transfer_engine`, once; each generator gets its own NCCL ranks) and,
per version, drives vLLM's own trainer-side engine
(`NCCLTrainerWeightTransferEngine.send_weights`): while it broadcasts the weights
packed into buckets of `bucket_mb` (vLLM's packed format: a few large
broadcasts, not one per parameter), every generator runs vLLM's
`start_weight_update` / `update_weights` / `finish_weight_update` (with the
version) as one `apply_weight_update` call (transport/push.py, atomic client), so
no request queued on a single-threaded actor runs in between. vLLM's worker
engine loads each bucket as it arrives inside a layerwise reload; a generator
whose update did not finish refuses to serve (actors/generator.py), so it serves
v or v+1, never a mix.

Every blocking step has a deadline. NCCL itself cannot be interrupted: after a
timeout the group is unusable, the transport says so on every later publish,
and the run must fail (which it does, since the TimeoutError propagates).

Nothing here touches CUDA or imports vLLM's NCCL modules at import time, so CPU
code paths can import the module; constructing the transport without CUDA
raises a clear error. This path has not been run on a GPU in this repository's
CI (CPU only); its bucket plan and metadata are tested against vLLM's own code.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

import torch

from transport.base import Defer, TransportOptions, WeightHandle
from transport.buckets import dtype_name
from transport.push import PushTransport, TimedClient


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("weights.transport 'nccl' needs CUDA on the learner and every generator (NCCL broadcasts "
                           "between GPUs); this machine has no CUDA device: use 'object_store' or 'disk'")


def update_info(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """vLLM's `NCCLWeightTransferUpdateInfo` as a dict: what every worker is told to expect, in send order."""
    return {"names": list(state), "dtype_names": [dtype_name(t.dtype) for t in state.values()],
            "shapes": [list(t.shape) for t in state.values()]}


def nccl_buckets(names: list[str], nbytes: list[int], bucket_bytes: int) -> list[list[str]]:
    """The buckets vLLM's packed broadcast forms (packed_tensor.pack_tensors): tensors are appended in order
    and a bucket closes once it exceeds `bucket_bytes`, so the last tensor may overflow it. Sender and
    receivers cut the same stream from metadata alone; this reproduces the cut for the handle and for logs."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, n in zip(names, nbytes, strict=True):
        current.append(name)
        size += n
        if size > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class StateSource:
    """vLLM's `WeightSource` contract over a full state dict from `Learner.full_state` (CPU tensors): metadata
    without data, then each tensor moved to the GPU only when the broadcast reaches it (bounded memory)."""

    def __init__(self, device: str = "cuda"):
        self.state: dict[str, torch.Tensor] = {}
        self.device = device

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.state.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.state.items():
            yield name, t.to(self.device)


def run_with_deadline(fn: Callable[[], None], timeout_s: float, what: str) -> None:
    """Run `fn` on a daemon thread and wait at most `timeout_s`: a peer stuck inside NCCL never returns, and a
    daemon thread at least does not keep the process alive after the run fails."""
    box: dict[str, BaseException] = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True, name="nccl-weights")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s}s")
    if "exc" in box:
        raise box["exc"]


class NcclPushTransport(PushTransport):
    name = "nccl"

    def __init__(self, bucket_mb: float, timeout_s: float, master_address: str, master_port: int):
        require_cuda()
        super().__init__(timeout_s)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.master_address, self.master_port = master_address, master_port
        self.source = StateSource()
        self.engine = None
        self.broken: str | None = None

    @classmethod
    def from_options(cls, options: TransportOptions) -> NcclPushTransport:
        return cls(options.bucket_mb, options.timeout_s, options.master_address, options.master_port)

    def _join(self, client: TimedClient) -> None:
        """Rank 0 of the learner only. Joins the NCCL group: rank 0 here, each generator's workers after it
        (`client.workers_per_generator` ranks each, tensor x pipeline parallel size)."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                   world_size=1 + client.workers_per_generator * len(client.peers), rank=0,
                                   packed=True, packed_buffer_size_bytes=self.bucket_bytes)
        peers = ", ".join(client.peers)
        box = {}
        run_with_deadline(lambda: box.setdefault("engine", NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=client, source=self.source)), self.timeout_s,
            f"NCCL rendezvous at {self.master_address}:{self.master_port} with generators {peers}")
        self.engine = box["engine"]

    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        """Returns once every generator serves `version`; `defer` is not used (the broadcast reads `state`)."""
        client = self._client(version)
        if self.broken:
            raise RuntimeError(f"weights version {version}: the NCCL group is unusable after {self.broken}")
        if not state:
            raise ValueError(f"weights version {version}: the state holds no tensors")
        self.source.state, client.version = state, version
        what = f"weights version {version}: NCCL broadcast to generators {', '.join(client.peers)}"
        try:
            run_with_deadline(self.engine.send_weights, self.timeout_s, what)
        except BaseException as exc:
            self.broken = f"{what} failed ({exc})"
            raise
        finally:
            self.source.state = {}
        info = update_info(state)
        buckets = nccl_buckets(info["names"], [t.nbytes for t in state.values()], self.bucket_bytes)
        return self._handle(version, {**info, "buckets": buckets}, sum(t.nbytes for t in state.values()))
