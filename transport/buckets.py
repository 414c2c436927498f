"""Weights in buckets: a state dict packed into a few flat byte buffers, with the metadata to unpack them.

Sending one message per parameter costs one round trip per tensor (hundreds for
a 0.5B model); sending the whole model as one buffer needs a second full copy
in memory. Buckets of at most `bucket_bytes` bound both. Each bucket holds one
dtype only, so a receiver can view a whole bucket as that dtype and so a bf16
bucket never straddles an fp32 one. A tensor bigger than a bucket travels alone
in an oversized bucket rather than being split: loaders take whole tensors.

The plan (names, dtypes, shapes, byte offsets) is computed from metadata only,
so the sender and every receiver can derive the same cut points without
moving data, and it is small enough to ride on a `WeightHandle`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside its bucket."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket
    nbytes: int


@dataclass(frozen=True)
class BucketMeta:
    """One flat uint8 buffer of a single dtype."""

    index: int
    dtype: str
    nbytes: int
    tensors: tuple[TensorMeta, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bucket metadata names unknown dtype {name!r}")
    return dtype


def plan_buckets(metas: Iterable[tuple[str, torch.dtype | str, tuple[int, ...]]], bucket_bytes: int) -> list[BucketMeta]:
    """Group (name, dtype, shape) into buckets of <= bucket_bytes per dtype, in first-seen dtype order and
    the given order within a dtype. Deterministic, so both ends of a transfer derive the same plan."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    by_dtype: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
    seen: set[str] = set()
    for name, dtype, shape in metas:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the state to bucket")
        seen.add(name)
        dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
        nbytes = math.prod(shape) * to_dtype(dt).itemsize
        by_dtype.setdefault(dt, []).append((name, tuple(shape), nbytes))
    buckets: list[BucketMeta] = []
    for dt, items in by_dtype.items():
        current: list[TensorMeta] = []
        size = 0
        for name, shape, nbytes in items:
            if current and size + nbytes > bucket_bytes:  # close the bucket; an oversized tensor goes alone
                buckets.append(BucketMeta(len(buckets), dt, size, tuple(current)))
                current, size = [], 0
            current.append(TensorMeta(name, dt, shape, size, nbytes))
            size += nbytes
        if current:
            buckets.append(BucketMeta(len(buckets), dt, size, tuple(current)))
    return buckets


def plan_for_state(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[BucketMeta]:
    return plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in state.items()), bucket_bytes)


def pack_bucket(state: dict[str, torch.Tensor], bucket: BucketMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the bucket's tensors into one flat uint8 buffer (`out` if given, e.g. shared memory).
    Tied tensors (one storage, two names) are written once per name: receivers load names, not storages."""
    buf = torch.empty(bucket.nbytes, dtype=torch.uint8) if out is None else out
    if buf.dtype != torch.uint8 or buf.numel() < bucket.nbytes:
        raise ValueError(f"bucket {bucket.index}: output buffer must be uint8 with >= {bucket.nbytes} bytes")
    for m in bucket.tensors:
        if m.name not in state:
            raise KeyError(f"bucket {bucket.index}: tensor {m.name!r} is in the plan but not in the state")
        t = state[m.name]
        if dtype_name(t.dtype) != m.dtype or tuple(t.shape) != m.shape:
            raise ValueError(f"bucket {bucket.index}: tensor {m.name!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, "
                             f"the plan says {m.dtype} {m.shape}")
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        buf[m.offset:m.offset + m.nbytes].copy_(flat)
    return buf


def unpack_bucket(buf: torch.Tensor, bucket: BucketMeta, copy: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a packed bucket; views of `buf` unless `copy` (needed when the
    buffer is reused or unmapped before the tensors are consumed)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < bucket.nbytes:
        raise ValueError(f"bucket {bucket.index}: expected a flat uint8 buffer of >= {bucket.nbytes} bytes, "
                         f"got {buf.dtype} {tuple(buf.shape)}")
    out = []
    for m in bucket.tensors:
        t = buf[m.offset:m.offset + m.nbytes].view(to_dtype(m.dtype)).view(m.shape)
        out.append((m.name, t.clone() if copy else t))
    return out


def pack_state(state: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[list[BucketMeta], list[torch.Tensor]]:
    plan = plan_for_state(state, bucket_bytes)
    return plan, [pack_bucket(state, b) for b in plan]


def unpack_state(plan: list[BucketMeta], buffers: Iterable[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    buffers = list(buffers)
    if len(buffers) != len(plan):
        raise ValueError(f"{len(buffers)} bucket buffers for a plan of {len(plan)} buckets")
    for b, buf in zip(plan, buffers):
        yield from unpack_bucket(buf, b)
