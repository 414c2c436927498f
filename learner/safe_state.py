"""The learner's resumable state as safetensors + JSON: a DeepSpeed checkpoint engine that never pickles.

DeepSpeed's own checkpoint engine `torch.save`s every file of a checkpoint (module state, each rank's ZeRO
optimizer partition with its fp32 master weights, scheduler, client state), and loading one means unpickling it:
running whatever code the file names. Relay keeps DeepSpeed's logic for *what* to save per ZeRO stage (it knows
how each stage partitions the optimizer) and swaps only the file format. Each file DeepSpeed asks for is one
safetensors file: the tensors under generated keys, and the structure around them (dicts, lists, numbers, a few
DeepSpeed value types) as JSON in the file's metadata. A value of any other type is refused at save time naming
where it sits; at load time only classes from DeepSpeed's own package are rebuilt, from their fields.

The file names stay DeepSpeed's (`mp_rank_00_model_states.pt`, `zero_pp_rank_0_mp_rank_00_optim_states.pt`)
because its loader finds files by those names; their content is safetensors (`safetensors.safe_open` reads them).
"""
from __future__ import annotations

import enum
import importlib
import json
import math
import os
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "relay-safe-state/1"
TREE_KEY = "relay.tree"
REBUILDABLE = ("deepspeed.",)
"""Packages whose classes (enums, named tuples, small state objects) may be rebuilt by name at load time."""


class UnsafeStateError(TypeError):
    """A value that cannot be stored without pickling, or a file that would need unpickling to load."""


def _class_name(cls: type, path: str) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    if not cls.__module__.startswith(REBUILDABLE):
        raise UnsafeStateError(f"{path}: {name} is not a DeepSpeed type; Relay stores no arbitrary objects "
                               f"(only tensors, numbers, strings, containers and DeepSpeed's own value types)")
    return name


def _class(name: str, path: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(REBUILDABLE):
        raise UnsafeStateError(f"{path}: refusing to rebuild {name}: only DeepSpeed's own types are rebuilt")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors) for `value`; tensors sharing memory are stored once or copied apart."""
    tensors: dict[str, torch.Tensor] = {}
    views: dict[tuple, str] = {}  # the same view of the same memory -> one key
    storages: set[int] = set()  # safetensors refuses tensors that overlap: copy any second view of a storage

    def tensor(t: torch.Tensor) -> dict:
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        view = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            return {"$t": views[view]}
        if ptr in storages and t.numel():
            t = t.clone()
        storages.add(ptr)
        key = views[view] = f"t{len(tensors)}"
        tensors[key] = t.contiguous()
        return {"$t": key}

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, enum.Enum):  # before int: some DeepSpeed enums are IntEnums
            return {"$enum": _class_name(type(x), path), "value": enc(x.value, path)}
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$float": repr(x)}
        if isinstance(x, torch.Tensor):
            return tensor(x)
        if isinstance(x, torch.Size):
            return {"$size": list(x)}
        if isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"$namedtuple": _class_name(type(x), path), "fields": [enc(v, f"{path}.{f}") for f, v in zip(x._fields, x)]}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, (set, frozenset)):
            return {"$set": [enc(v, f"{path}{{}}") for v in x]}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"$items": [[enc(k, f"{path}<key>"), enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if hasattr(x, "item") and getattr(x, "shape", None) == ():  # numpy scalars
            return enc(x.item(), path)
        if hasattr(x, "__dict__"):  # DeepSpeed's small state objects (loss scalers): their fields
            return {"$object": _class_name(type(x), path), "state": enc(vars(x), path)}
        raise UnsafeStateError(f"{path}: a {type(x).__qualname__} cannot be stored in a safetensors checkpoint")

    return enc(value, "state"), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """Inverse of `encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict):
        return tree
    if "$t" in tree:
        return tensors[tree["$t"]]
    if "$float" in tree:
        return float(tree["$float"])
    if "$size" in tree:
        return torch.Size(tree["$size"])
    if "$dtype" in tree:
        return getattr(torch, tree["$dtype"])
    if "$tuple" in tree:
        return tuple(decode(v, tensors, path) for v in tree["$tuple"])
    if "$set" in tree:
        return {decode(v, tensors, path) for v in tree["$set"]}
    if "$items" in tree:
        return {decode(k, tensors, path): decode(v, tensors, path) for k, v in tree["$items"]}
    if "$enum" in tree:
        return _class(tree["$enum"], path)(decode(tree["value"], tensors, path))
    if "$namedtuple" in tree:
        return _class(tree["$namedtuple"], path)(*(decode(v, tensors, path) for v in tree["fields"]))
    if "$object" in tree:
        cls = _class(tree["$object"], path)
        obj = cls.__new__(cls)
        obj.__dict__.update(decode(tree["state"], tensors, path))
        return obj
    return {k: decode(v, tensors, f"{path}.{k}") for k, v in tree.items()}


def save(value: Any, path: str) -> None:
    tree, tensors = encode(value)
    save_file(tensors, path, metadata={"format": FORMAT, TREE_KEY: json.dumps(tree)})


def load(path: str, device: torch.device | str = "cpu") -> Any:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 — anything unreadable as safetensors is refused, never unpickled
        raise UnsafeStateError(f"{path} is not a safetensors file (a checkpoint in DeepSpeed's pickle format?); "
                               f"Relay does not unpickle checkpoints: {e}") from e
    if meta.get("format") != FORMAT:
        raise UnsafeStateError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return decode(json.loads(meta[TREE_KEY]), load_file(path, device=str(device)))


class SafetensorsCheckpointEngine(CheckpointEngine):
    """DeepSpeed's `TorchCheckpointEngine` with `save`/`load` through safetensors + JSON instead of pickle."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "RelaySafetensorsCheckpointEngine"

    def create(self, info: CheckpointCommitInfo):
        pass

    def save(self, state_dict, path: str):
        tmp = f"{path}.tmp"
        save(state_dict, tmp)
        os.replace(tmp, path)

    def load(self, path: str, map_location=None):
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return load(path, device)

    def commit(self, info: CheckpointCommitInfo):
        return True

    def preserves_storage_sharing(self):
        return False  # `encode` separates shared storage itself
