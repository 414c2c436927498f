"""safetensors files in a directory every node can read, as the weight transport.

Each version is written to a temporary name and renamed, so a generator never reads half a file; only the newest
`keep` versions stay on disk. A shared filesystem may show a file late, so a fetch waits for it up to its deadline.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from transport.base import Defer, NamedTensors, TransportOptions, WeightHandle, WeightTransport


class DiskTransport(WeightTransport):
    name = "disk"
    carries_adapters = True

    def __init__(self, directory: str, keep: int = 2):
        self.dir, self.keep = Path(directory), keep
        self.dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_options(cls, options: TransportOptions) -> DiskTransport:
        return cls(os.path.join(options.run_dir, "weights"))

    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        """Written here, `defer` or not: the file must exist before its handle does."""
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
        return self._handle(version, str(path), sum(t.nbytes for t in tensors.values()))

    def fetch(self, handle: WeightHandle, timeout_s: float) -> NamedTensors:
        from safetensors import safe_open

        deadline = time.monotonic() + timeout_s
        while not os.path.exists(handle.payload):
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {handle.version}: {handle.payload} did not appear within {timeout_s}s")
            time.sleep(0.05)
        with safe_open(handle.payload, framework="pt") as f:
            tensors = [(n, f.get_tensor(n)) for n in f.keys()]
        return iter(tensors)
