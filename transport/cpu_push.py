"""The `relay_cpu` push transport: NCCL's CPU stand-in, through the same vLLM weight-transfer API.

Each version is packed into buckets (transport/buckets.py), each bucket a file in shared memory (/dev/shm), and
one `update_weights` call per generator carries every bucket's path and layout; the generator's vLLM engine
(transport/cpu_engine.py) copies them out and loads the version whole. The files are deleted once every generator
has applied it. Generators must share the learner's host.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from transport.base import Defer, TransportOptions, WeightHandle
from transport.buckets import BucketMeta, pack_bucket, plan_for_state
from transport.push import PushTransport


class CpuBucketPushTransport(PushTransport):
    name = "relay_cpu"
    crosses_nodes = False  # buckets travel as files in this host's /dev/shm

    def __init__(self, bucket_mb: float = 256.0, timeout_s: float = 120.0, directory: str | None = None):
        super().__init__(timeout_s)
        self.bucket_bytes = max(int(bucket_mb * 2**20), 1)
        base = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.dir = Path(tempfile.mkdtemp(prefix="relay-weights-", dir=base))

    @classmethod
    def from_options(cls, options: TransportOptions) -> CpuBucketPushTransport:
        return cls(options.bucket_mb, options.timeout_s)

    def publish(self, version: int, state: dict[str, torch.Tensor], defer: Defer | None = None) -> WeightHandle:
        """Returns once every generator serves `version`; `defer` is not used (the generators read the buckets)."""
        client = self._client(version)
        plan = plan_for_state(state, self.bucket_bytes)
        if not plan:
            raise ValueError(f"weights version {version}: the state holds no tensors")
        client.version = version
        vdir = self.dir / f"v{version:08d}"
        vdir.mkdir(exist_ok=True)
        try:
            buckets = []
            for bucket in plan:
                path = vdir / f"bucket{bucket.index:05d}.bin"
                _write_bucket(state, bucket, path)
                buckets.append({"path": str(path), "bucket": asdict(bucket)})
            client.start_weight_update()
            client.update_weights({"buckets": buckets})  # one call per version; the data stays in shared memory
            client.finish_weight_update()
        finally:
            shutil.rmtree(vdir, ignore_errors=True)
        return self._handle(version, {"buckets": plan}, sum(b.nbytes for b in plan))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_bucket(state: dict[str, torch.Tensor], bucket: BucketMeta, path: Path) -> None:
    """Pack straight into a file-backed buffer, then rename, so a reader never sees a partial bucket."""
    tmp = path.with_suffix(".tmp")
    buf = torch.from_file(str(tmp), shared=True, size=bucket.nbytes, dtype=torch.uint8)
    pack_bucket(state, bucket, out=buf)
    del buf
    os.replace(tmp, path)
