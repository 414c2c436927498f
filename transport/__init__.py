"""How new weights travel from the learner to the generators, behind one small interface.

Pull (the generator fetches at its next safe point): object store, disk. Push (publish applies the version in
every generator through vLLM's weight-transfer engine API): NCCL on GPUs, shared memory on one CPU host.
"""
from transport.engine import PushTransport, SharedMemoryTransport, TimedClient
from transport.weights import DiskTransport, ObjectStoreTransport, WeightHandle, WeightTransport, make_transport

__all__ = ["DiskTransport", "ObjectStoreTransport", "PushTransport", "SharedMemoryTransport", "TimedClient",
           "WeightHandle", "WeightTransport", "make_transport"]
