"""The weight-transport package's shape: every module imports on its own (no cycle), the registry builds each
transport by its config name, the base class's optional hooks do nothing, and each transport builds its own handle.
Fast: no Ray, no vLLM engine (one subprocess imports vLLM for the relay_cpu worker engine)."""
from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from transport.base import TransportOptions, WeightHandle, WeightTransport
from transport.cpu_push import CpuBucketPushTransport
from transport.disk import DiskTransport
from transport.object_store import ObjectStoreTransport, from_numpy
from transport.registry import TRANSPORTS, make_transport, pushes, transport_class
from transport.shared_slots import SharedSlotTransport

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "transport").glob("*.py") if p.stem != "__init__")

# Each module imported with no other Relay module loaded: a cycle shows up as an ImportError from some entry point.
# Third-party libraries stay loaded between modules (importing torch and vLLM once each keeps this fast); only
# Relay's own modules are dropped, and a cycle can only run through those.
ISOLATED_IMPORTS = """
import importlib, sys
import numpy, torch
relay = ("transport", "actors", "learner", "launch", "buffer", "common")
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in relay]:
        del sys.modules[loaded]
    importlib.import_module("transport." + name)
    if leaked := sorted({m.split(".")[0] for m in sys.modules} & set(relay) - {"transport"}):
        raise SystemExit(f"transport.{name} imports {leaked}")
    if name != "registry" and "transport.registry" in sys.modules:
        raise SystemExit(f"transport.{name} imports the registry, which imports it")
"""


def test_every_transport_module_imports_on_its_own():
    assert {"base", "object_store", "disk", "shared_slots", "push", "cpu_push", "nccl", "registry"} <= set(MODULES)
    proc = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *MODULES], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_registry_builds_each_transport_by_its_config_name(tmp_path):
    from launch.config import WeightSyncConfig

    assert set(typing.get_args(WeightSyncConfig.model_fields["transport"].annotation)) == set(TRANSPORTS)
    expected = {"object_store": ObjectStoreTransport, "disk": DiskTransport, "shared_memory": SharedSlotTransport,
                "relay_cpu": CpuBucketPushTransport}
    for name, cls in expected.items():
        transport = make_transport(name, str(tmp_path), bucket_mb=1, timeout_s=7)
        try:
            assert type(transport) is cls and transport.name == name and transport_class(name) is cls
        finally:
            transport.close()
    assert make_transport("disk", str(tmp_path)).dir == tmp_path / "weights"
    assert make_transport("relay_cpu", "", bucket_mb=1, timeout_s=7).timeout_s == 7
    assert {n: pushes(n) for n in TRANSPORTS} == {"object_store": False, "shared_memory": False, "disk": False,
                                                  "nccl": True, "relay_cpu": True}


def test_nccl_is_registered_and_needs_cuda():
    assert transport_class("nccl").__name__ == "NcclPushTransport"  # importable without CUDA
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="'nccl' needs CUDA.*use 'object_store' or 'disk'"):
        make_transport("nccl", "", bucket_mb=64, timeout_s=5)


def test_an_unknown_name_lists_the_available_ones():
    for ask in (make_transport, transport_class, pushes):
        with pytest.raises(ValueError, match="weights.transport 'gloo': available: object_store, shared_memory, "
                                             "disk, nccl, relay_cpu"):
            ask("gloo")


class _Minimal(WeightTransport):
    name = "minimal"

    def publish(self, version, state, defer=None):
        return self._handle(version, state, 0)

    def fetch(self, handle, timeout_s):
        return iter(handle.payload.items())


class _Receiver:
    """A `WeightReceiver` that records what it is asked."""

    id, version = "gen-test", 0

    def __init__(self):
        self.loaded: dict[int, dict] = {}

    def load_weights(self, version, named_tensors):
        self.loaded[version] = dict(named_tensors)
        self.version = version

    def weight_layout(self):
        raise AssertionError("a pull transport that is not shared_memory never asks for a layout")

    def attach_slot(self, version, slot, layout):
        raise AssertionError("only shared_memory serves from a slot")


def test_optional_hooks_do_nothing_and_apply_loads_what_fetch_yields():
    t, receiver = _Minimal(), _Receiver()
    assert not t.pushes and t.connect({"gen-test": receiver}) is None and t.close() is None
    assert t.attach(receiver) is None and receiver.loaded == {}
    assert _Minimal.from_options(TransportOptions(run_dir="/nowhere")).name == "minimal"
    state = {"w": torch.ones(2)}
    t.apply(t.publish(4, state), receiver, timeout_s=1)
    assert receiver.version == 4 and torch.equal(receiver.loaded[4]["w"], state["w"])


class _Defer:
    """What a learner rank passes as `defer`: keeps the copy for later and returns a stand-in for its ObjectRef."""

    def __init__(self):
        self.copies = []

    def __call__(self, copy):
        self.copies.append(copy)
        return f"ref-{len(self.copies)}"


def _state():
    return {"embed": torch.randn(3, 4, dtype=torch.bfloat16), "norm": torch.randn(4)}


def test_object_store_defers_its_copy_and_builds_its_handle():
    state, defer = _state(), _Defer()
    handle = ObjectStoreTransport().publish(3, state, defer=defer)
    assert (handle.version, handle.transport, handle.payload) == (3, "object_store", "ref-1")
    assert handle.nbytes == 3 * 4 * 2 + 4 * 4 and handle.dtypes == {"embed": "bfloat16"}
    arrays = defer.copies[0]()  # what the rank's second thread returns, and Ray copies into the store
    assert arrays["embed"].dtype.name == "int16"  # numpy has no bf16: its bits travel
    got = dict(from_numpy(arrays, handle.dtypes))
    assert all(torch.equal(got[k], state[k]) for k in state) and got["embed"].dtype == torch.bfloat16


def test_disk_writes_before_its_handle_exists_and_ignores_defer(tmp_path):
    state, defer = _state(), _Defer()
    t = DiskTransport(str(tmp_path))
    handle = t.publish(5, state, defer=defer)
    assert defer.copies == [] and Path(handle.payload).is_file()
    assert (handle.version, handle.transport, handle.nbytes, handle.dtypes) == (5, "disk", 3 * 4 * 2 + 4 * 4, {})
    got = dict(t.fetch(handle, timeout_s=1))
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_shared_slots_defer_the_write(tmp_path):
    state, defer = _state(), _Defer()
    t = SharedSlotTransport(str(tmp_path / "slots"))
    handle = t.publish(2, state, defer=defer)  # no layout registered yet: nothing is read until the copy runs
    assert (handle.payload, handle.nbytes, len(defer.copies)) == ("ref-1", 3 * 4 * 2 + 4 * 4, 1)
    with pytest.raises(ValueError, match="no generator registered a layout"):
        defer.copies[0]()


class _Peer:
    def __init__(self):
        self.calls = []

    def init_weight_transfer_engine(self, info):
        self.calls.append(("init", info))


def test_a_push_transport_publishes_only_once_connected():
    t = CpuBucketPushTransport(bucket_mb=1, timeout_s=5)
    try:
        assert t.pushes
        with pytest.raises(RuntimeError, match="weights version 1: relay_cpu transport is not connected"):
            t.publish(1, _state())
        peer = _Peer()
        t.connect({"gen-0": peer})
        assert peer.calls == [("init", {})] and list(t.client.peers) == ["gen-0"] and t.client.timeout_s == 5
        with pytest.raises(RuntimeError, match="pushes weights during publish"):
            t.fetch(WeightHandle(1, "relay_cpu", None, 0), timeout_s=1)
    finally:
        t.close()


def test_a_push_transport_gives_each_tensor_parallel_worker_a_rank():
    """`connect` carries the engines' tensor-parallel size to the client, which spaces each generator's rank block
    by it (tests/test_weight_nccl.py), so every worker of a tp>1 engine receives the broadcast."""
    t = CpuBucketPushTransport(bucket_mb=1, timeout_s=5)
    try:
        t.connect({"gen-0": _Peer(), "gen-1": _Peer()}, workers_per_generator=2)
        assert t.client.workers_per_generator == 2
    finally:
        t.close()
