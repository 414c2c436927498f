"""How new weights travel from the learner to the generators, behind one small interface."""
from transport.weights import DiskTransport, ObjectStoreTransport, WeightHandle, WeightTransport, make_transport

__all__ = ["DiskTransport", "ObjectStoreTransport", "WeightHandle", "WeightTransport", "make_transport"]
