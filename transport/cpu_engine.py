"""The vLLM worker side of `relay_cpu` (`transport.cpu_push.CpuBucketPushTransport`): a weight-transfer engine on CPU.

vLLM's own engines (nccl, ipc, ...) all need CUDA. This one plugs into the same
factory and the same worker methods, so `init_weight_transfer_engine` /
`start_weight_update` / `update_weights` / `finish_weight_update` run for real
in CPU tests. Importing this module registers it as backend "relay_cpu"; in a
multiprocess engine the import must happen in the worker (e.g. from a
`worker_extension_cls` module).

Whole or nothing: buckets are copied out of shared memory as they arrive and
loaded only in `finish_weight_update`, once every bucket is here. A transfer that
fails mid-way leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from transport import plain_weights
from transport.buckets import BucketMeta, TensorMeta, unpack_bucket

BACKEND = "relay_cpu"


@dataclass
class SharedMemoryInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: buckets arrive as files on the shared host."""


@dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    """Buckets of one version: for each, where its bytes are and how to cut them (`path`, a `BucketMeta` dict)."""

    buckets: list[dict]


def bucket_meta(b: dict) -> BucketMeta:
    tensors = tuple(TensorMeta(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"]) for t in b["tensors"])
    return BucketMeta(b["index"], b["dtype"], b["nbytes"], tensors)


class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
    init_info_cls = SharedMemoryInitInfo
    update_info_cls = SharedMemoryUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.pending: list[tuple[str, torch.Tensor]] | None = None

    def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        self.pending = []

    def update_weights(self, update_info: dict) -> None:
        # the base class would call torch.accelerator.synchronize(), which has no CPU device to wait on
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        if self.pending is None:
            raise RuntimeError("relay_cpu weight transfer: update_weights before start_weight_update")
        for item in update_info.buckets:
            meta = bucket_meta(item["bucket"])
            buf = torch.from_file(item["path"], shared=False, size=meta.nbytes, dtype=torch.uint8)  # (nbytes,)
            self.pending.extend(unpack_bucket(buf, meta, copy=True))  # own the bytes: the sender deletes the files

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        if not self.pending:
            raise RuntimeError("relay_cpu weight transfer: finish_weight_update without any received bucket")
        tensors, self.pending = self.pending, None
        if plain_weights.active():  # linear weights in PyTorch layout: a copy into place, no repack
            plain_weights.copy_into(self.model, tensors)
            return
        initialize_layerwise_reload(self.model)
        self.model.load_weights(tensors)
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self.pending = None


if BACKEND not in WeightTransferEngineFactory._registry:  # importing twice must not fail
    WeightTransferEngineFactory.register_engine(BACKEND, SharedMemoryWeightTransferEngine)
