"""Weights through shared-memory slots that vLLM serves from directly: one copy from learner to serving.

The object store moves a version with two copies (learner -> store, store -> the engine's parameters). Here the
learner copies each version straight into a slot: a file in /dev/shm laid out exactly as the generators' vLLM
model holds its parameters (q/k/v and gate/up fused, the vocabulary padded), and a generator serves it by pointing
its parameters at views of that file — no copy on the generator's side at all (it needs the plain CPU layout,
`actors.cpu_weight_layout: plain`, the default). One host only: the learner and every generator share /dev/shm.

The generator's engine maps the slot itself: in the rollout actor's process (the synchronous engine) or in vLLM's
engine process (in-flight updates, `RelayWorkerExtension.relay_attach_slot`); the actor holds the lock either way.

Safety comes from file locks, which the kernel drops when a process dies:
- a generator holds a shared lock on the slot it serves; the learner writes only slots it can lock exclusively,
  so it never changes weights under a running generator, and a slot comes free once every generator moved on;
- a slot's header says which version it holds and whether the write finished (a learner that died mid-write
  leaves it unsealed; a generator refuses it and keeps its version whole);
- a generator handed version v whose slot was meanwhile rewritten with a newer sealed version serves that
  newer one (versions only move forward).
Slots are reused, so their pages and both sides' mappings are set up once; a slot is created only when every
existing one is in use (a run needs about one per generator plus two).

The layout comes from the generators: each computes it from its own vLLM model (`vllm_layout`), checks it
against the checkpoint it loaded (every parameter must equal the parts it is said to hold), and registers it in
the slot directory, where the learner reads it at its first publish.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import itertools
import json
import mmap
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import torch

from transport.base import Defer, WeightHandle, WeightReceiver, WeightTransport

HEADER = 4096  # bytes before the first region; regions start 64-byte aligned
_HEAD = struct.Struct("<8sqq40s")  # magic, version, sealed, layout id
MAGIC = b"RELAYSLT"
LAYOUT_FILE = "layout.json"
CHUNK = 8 << 20  # the learner's copy is cut into pieces of this many bytes, shared out between its threads


class LayoutError(ValueError):
    """The served model's parameters cannot be described as slices of the learner's tensors."""


# ---- layout (generator side, from the live vLLM model) ----------------------------------------------------------
def vllm_layout(model: torch.nn.Module, checkpoint) -> dict:
    """Where each parameter of a vLLM model sits in a slot, and which checkpoint tensors fill it.

    A fused parameter (the model's `packed_modules_mapping`, e.g. qkv_proj <- q_proj, k_proj, v_proj) holds its
    parts' rows one after another; any rows after the parts (vocabulary padding) stay zero. `checkpoint` is what
    the model was loaded from (anything with `get(name)`): every parameter must equal its parts, or this raises (vLLM transformed the
    weights in a way a slot cannot reproduce)."""
    fused = getattr(type(model), "packed_modules_mapping", {}) or {}
    regions, offset = [], HEADER
    for name, param in model.named_parameters():  # tied parameters appear once
        if param.ndim == 0:
            raise LayoutError(f"vLLM parameter {name} is a scalar")
        module, _, leaf = name.rpartition(".")
        parent, _, child = module.rpartition(".")
        sources = [f"{parent}.{c}.{leaf}" if parent else f"{c}.{leaf}" for c in fused[child]] if child in fused else [name]
        parts, row = [], 0
        for src in sources:
            t = checkpoint.get(src)
            if t is None:
                raise LayoutError(f"vLLM parameter {name}: the checkpoint has no tensor {src}")
            if t.ndim != param.ndim or tuple(t.shape[1:]) != tuple(param.shape[1:]):
                raise LayoutError(f"vLLM parameter {name} {tuple(param.shape)}: part {src} has shape {tuple(t.shape)}")
            data = param.data[row:row + t.shape[0]]
            if data.shape != t.shape or not torch.equal(data, t.to(param.dtype)):
                raise LayoutError(f"vLLM parameter {name}: rows {row}..{row + t.shape[0]} do not hold {src} as loaded")
            parts.append([src, row, int(t.shape[0])])
            row += t.shape[0]
        if row < param.shape[0] and param.data[row:].count_nonzero():
            raise LayoutError(f"vLLM parameter {name}: rows after its parts ({row}..{param.shape[0]}) are not zero")
        nbytes = param.numel() * param.element_size()
        regions.append({"name": name, "dtype": str(param.dtype).removeprefix("torch."), "shape": list(param.shape),
                        "offset": offset, "parts": parts})
        offset += -(-nbytes // 64) * 64
    layout = {"format": "relay-slots/1", "nbytes": offset, "regions": regions}
    layout["id"] = hashlib.sha1(json.dumps(layout, sort_keys=True).encode()).hexdigest()
    return layout


class _Checkpoint:
    """The tensors of a safetensors checkpoint, each read when asked for: checking a layout never holds the whole
    checkpoint in memory beside the engine's own copy."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                self.where.update(dict.fromkeys(h.keys(), f))

    def get(self, name: str):
        from safetensors import safe_open

        if name not in self.where:
            return None
        with safe_open(self.where[name], framework="pt") as h:
            return h.get_tensor(name)


def read_checkpoint(model_path: str) -> _Checkpoint:
    """A local (or cached hub) safetensors checkpoint, read tensor by tensor."""
    directory = model_path
    if not os.path.isdir(directory):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(model_path, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise LayoutError(f"{model_path}: no safetensors files to check the shared-memory layout against")
    return _Checkpoint(files)


# ---- one slot file, mapped once per process ---------------------------------------------------------------------
class Slot:
    def __init__(self, path: str, nbytes: int, create: bool = False):
        self.path, self.nbytes = path, nbytes
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        if create:
            os.posix_fallocate(self.fd, 0, nbytes)  # on tmpfs: the pages exist from now on
        elif os.fstat(self.fd).st_size < nbytes:
            raise LayoutError(f"weights slot {path} holds {os.fstat(self.fd).st_size} bytes, the layout needs {nbytes}")
        self.mm = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)

    def try_lock(self, exclusive: bool) -> bool:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def header(self) -> tuple[int, bool, str]:
        magic, version, sealed, layout_id = _HEAD.unpack_from(self.mm, 0)
        if magic != MAGIC:
            return -1, False, ""
        return version, bool(sealed), layout_id.decode()

    def set_header(self, version: int, sealed: bool, layout_id: str) -> None:
        _HEAD.pack_into(self.mm, 0, MAGIC, version, int(sealed), layout_id.encode())

    def view(self, region: dict) -> torch.Tensor:
        dtype = getattr(torch, region["dtype"])
        n = 1
        for d in region["shape"]:
            n *= d
        start = region["offset"]
        return self.buf[start:start + n * dtype.itemsize].view(dtype).view(region["shape"])


# ---- the transport ----------------------------------------------------------------------------------------------
class SharedSlotTransport(WeightTransport):
    """Learner: `write` a version into a free slot. Generator: `apply` points the engine at it."""

    name = "shared_memory"
    crosses_nodes = False  # the learner and the generators map the same /dev/shm files

    def __init__(self, directory: str | None = None, threads: int | None = None):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.dir = directory or tempfile.mkdtemp(prefix="relay-slots-", dir=base)
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._init_local()

    def _init_local(self) -> None:
        self._slots: dict[str, Slot] = {}  # path -> mapping, this process
        self._layout: dict | None = None
        self._last: str | None = None  # learner: the slot written last (generators may be about to take it)
        self._held: Slot | None = None  # generator: the slot it serves, shared-locked
        self._lock = threading.Lock()
        self._pool = None  # learner: the copy's helper threads, started at the first write

    def __getstate__(self):  # mappings, fds, locks and threads stay in the process that made them
        return {"dir": self.dir, "threads": self.threads}

    def __setstate__(self, state):
        self.dir, self.threads = state["dir"], state["threads"]
        self._init_local()

    # -- generator side --
    def attach(self, receiver: WeightReceiver) -> None:
        """The learner writes every version in this generator's layout."""
        self.register_layout(receiver.weight_layout())

    def register_layout(self, layout: dict) -> None:
        """A generator says how its model holds the weights; every generator of a run must agree."""
        os.makedirs(self.dir, exist_ok=True)
        path = Path(self.dir) / LAYOUT_FILE
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(layout))
        try:
            os.link(tmp, path)  # the first generator's layout wins; later ones must match it
        except FileExistsError:
            known = json.loads(path.read_text())["id"]
            if known != layout["id"]:
                raise LayoutError(f"this generator's model layout {layout['id'][:12]} differs from the one registered in "
                                  f"{path} ({known[:12]}): every generator must serve the same model") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._layout = layout

    def apply(self, handle: WeightHandle, generator: WeightReceiver, timeout_s: float) -> None:
        """Serve the version of `handle` (or a newer one its slot now holds) by pointing the engine at its slot."""
        info = _resolve(handle, timeout_s)
        layout = generator.weight_layout()
        slot = self._slot(info["path"], layout["nbytes"])
        if slot is self._held:  # already served here; no writer can have touched it since
            return
        deadline = time.monotonic() + timeout_s
        while not slot.try_lock(exclusive=False):  # the learner is writing it (again)
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {handle.version}: slot {slot.path} stayed locked by a writer for {timeout_s}s")
            time.sleep(0.001)
        try:
            version, sealed, layout_id = slot.header()
            if not sealed:
                raise RuntimeError(f"weights version {handle.version}: slot {slot.path} holds an unfinished write "
                                   f"(version {version}); the learner died or failed while writing it")
            if layout_id != layout["id"]:
                raise LayoutError(f"weights version {handle.version}: slot {slot.path} was written for layout "
                                  f"{layout_id[:12]}, this generator serves {layout['id'][:12]}")
            if version < handle.version:
                raise RuntimeError(f"weights version {handle.version}: slot {slot.path} holds older version {version}")
            if version <= generator.version:
                raise _Stale()
            generator.attach_slot(version, slot, layout)
        except _Stale:
            slot.unlock()
            return
        except BaseException:
            slot.unlock()
            raise
        if self._held is not None:
            self._held.unlock()  # the learner may now reuse the slot served before
        self._held = slot

    # -- learner side --
    def write(self, version: int, state: dict[str, torch.Tensor]) -> dict:
        """Copy a full state into a slot no generator serves; returns where it is (what the handle resolves to)."""
        t0 = time.perf_counter()
        with self._lock:  # two publishes in a row may both be writing
            layout = self._layout or self._read_layout(version)
            slot = self._free_slot(layout["nbytes"])
            try:
                slot.set_header(version, False, layout["id"])
                self._copy(self._copies(version, state, layout, slot))
                slot.set_header(version, True, layout["id"])
            finally:
                slot.unlock()
            self._last = slot.path
            return {"path": slot.path, "version": version, "write_s": time.perf_counter() - t0}

    @staticmethod
    def _copies(version: int, state: dict[str, torch.Tensor], layout: dict, slot: Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) pairs of one version, cut into pieces of at most CHUNK bytes."""
        pairs = []
        for region in layout["regions"]:
            dst = slot.view(region)
            for src, row, rows in region["parts"]:
                t = state.get(src)
                if t is None:
                    raise KeyError(f"weights version {version}: the learner's state has no {src}, "
                                   f"which the generators serve in {region['name']}")
                d, t = dst[row:row + rows], t.detach().reshape(rows, *region["shape"][1:])
                step = max(CHUNK // max(d[:1].numel() * d.element_size(), 1), 1)
                pairs += [(d[i:i + step], t[i:i + step]) for i in range(0, rows, step)]
        return pairs

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The copy on `threads` threads (one core's copy does not saturate memory bandwidth; copy_ releases
        the GIL), this one included; torch's own thread pool is left alone, the learner trains with it."""
        if self.threads <= 1:
            for d, t in pairs:
                d.copy_(t)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="relay-slot-copy")
        shares = [pairs[i::self.threads] for i in range(self.threads)]  # chunks interleaved: equal bytes per thread
        run = lambda share: [d.copy_(t) for d, t in share]  # noqa: E731
        futures = [self._pool.submit(run, share) for share in shares[1:]]
        run(shares[0])
        for f in futures:
            f.result()

    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        """With `defer` (a learner rank) the handle carries the ObjectRef of the `write` on the rank's second
        thread; without it the version is written before the handle exists."""
        if defer is not None:
            return self._handle(version, defer(lambda: self.write(version, state)), sum(t.nbytes for t in state.values()))
        info = self.write(version, state)
        return self._handle(version, info, self._layout["nbytes"])

    def fetch(self, handle: WeightHandle, timeout_s: float):
        raise RuntimeError(f"weights version {handle.version}: the shared_memory transport is served in place "
                           "(RolloutActor calls apply), not fetched as tensors")

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def _read_layout(self, version: int) -> dict:
        path = Path(self.dir) / LAYOUT_FILE
        if not path.exists():
            raise LayoutError(f"weights version {version}: no generator registered a layout in {self.dir}; the "
                              "shared_memory transport needs the generators on the learner's host")
        self._layout = json.loads(path.read_text())
        return self._layout

    def _slot(self, path: str, nbytes: int, create: bool = False) -> Slot:
        if path not in self._slots:
            self._slots[path] = Slot(path, nbytes, create)
        return self._slots[path]

    def _free_slot(self, nbytes: int) -> Slot:
        """An existing slot locked exclusively (not the one written last, which generators may be about to take),
        else a new one."""
        for path in sorted(glob.glob(os.path.join(self.dir, "slot-*.bin"))):
            if path != self._last and (slot := self._slot(path, nbytes)).try_lock(exclusive=True):
                return slot
        for i in itertools.count(len(glob.glob(os.path.join(self.dir, "slot-*.bin")))):
            try:
                slot = self._slot(os.path.join(self.dir, f"slot-{i:04d}.bin"), nbytes, create=True)
            except FileExistsError:
                continue
            if slot.try_lock(exclusive=True):
                return slot


class _Stale(Exception):
    """The slot holds nothing newer than what the generator serves."""


def _resolve(handle: WeightHandle, timeout_s: float) -> dict:
    """The handle's payload: where the learner wrote the version (an ObjectRef of that write from a learner rank)."""
    if isinstance(handle.payload, dict):
        return handle.payload
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(handle.payload, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise TimeoutError(f"weights version {handle.version}: the learner's write did not finish within {timeout_s}s") from exc
