"""Weight transports by config name (`weights.transport`): the only place that knows them all.

Each transport's module is imported only when its name is asked for, so choosing `object_store` never imports
vLLM's NCCL code, and no transport module imports this one (the dependencies point one way: registry ->
transports -> base).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transport.base import WeightTransport

TRANSPORTS = {  # config name -> "module:class"
    "object_store": "transport.object_store:ObjectStoreTransport",
    "shared_memory": "transport.shared_slots:SharedSlotTransport",
    "disk": "transport.disk:DiskTransport",
    "nccl": "transport.nccl:NcclPushTransport",
    "relay_cpu": "transport.cpu_push:CpuBucketPushTransport",
}


def transport_class(name: str) -> type[WeightTransport]:
    if name not in TRANSPORTS:
        raise ValueError(f"weights.transport {name!r}: available: {', '.join(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def pushes(name: str) -> bool:
    """Whether `name` applies each version inside publish: its trainer side lives on learner rank 0, it must be
    connected to every generator first, and the fleet is fixed from then on."""
    return transport_class(name).pushes


def make_transport(name: str, run_dir: str = "", bucket_mb: float = 256.0, timeout_s: float = 120.0,
                   master_address: str = "127.0.0.1", master_port: int = 0) -> WeightTransport:
    """A pull transport ready to use, or a push transport that still needs `connect(peers)`."""
    from transport.base import TransportOptions

    options = TransportOptions(run_dir, bucket_mb, timeout_s, master_address, master_port)
    return transport_class(name).from_options(options)
