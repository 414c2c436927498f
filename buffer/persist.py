"""Buffer checkpoints: Arrow IPC files plus a JSON manifest, written so a crash never leaves a torn one.

Layout of a checkpoint directory:
    manifest.json          counters, per-group metadata, and for each data file its size and sha256
    groups-<gen>.arrow     one record batch per held group (IPC file format)
    pending-<gen>.arrow    parts of groups still waiting for their other members
Data files carry a fresh generation in their name and the manifest is replaced last (write to a
temporary name, fsync, os.replace), so the manifest on disk always names complete files. Files of
older generations are deleted after the new manifest is in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from buffer.groups import GroupEntry
from buffer.schema import ROLLOUT_SCHEMA

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BufferCorruptError(RuntimeError):
    """A checkpoint file is missing, truncated, or fails its checksum; the message names the file."""


@dataclass
class Snapshot:
    """What a checkpoint holds: groups with their metadata, parts of groups, and counters."""

    groups: list[pa.RecordBatch]
    meta: list[dict]
    pending: list[pa.RecordBatch]
    counters: dict


def entry_meta(entry: GroupEntry) -> dict:
    return {
        "group_id": entry.group_id,
        "policy_version": entry.policy_version,
        "seq": entry.seq,
        "offline": entry.offline,
        "score": entry.score,
        "times_served": entry.times_served,
    }


def entry_from_meta(batch: pa.RecordBatch, meta: dict) -> GroupEntry:
    return GroupEntry(batch=batch, **meta)


def write_snapshot(path: str, snap: Snapshot) -> None:
    os.makedirs(path, exist_ok=True)
    gen = f"{time.time_ns()}-{os.getpid()}"
    files = {
        "groups": _write_arrow(path, f"groups-{gen}.arrow", snap.groups),
        "pending": _write_arrow(path, f"pending-{gen}.arrow", snap.pending),
    }
    manifest = {"format": FORMAT_VERSION, "files": files, "groups": snap.meta, "counters": snap.counters}
    _atomic_write(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
    keep = {f["name"] for f in files.values()} | {MANIFEST}
    for name in os.listdir(path):
        if name not in keep and name.endswith((".arrow", ".tmp")):
            os.remove(os.path.join(path, name))


def read_snapshot(path: str) -> Snapshot:
    """The checkpoint under path; FileNotFoundError if there is none, BufferCorruptError if it is damaged."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"no buffer checkpoint: {manifest_path} does not exist")
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read())
        files, meta, counters = manifest["files"], manifest["groups"], manifest["counters"]
    except (ValueError, KeyError, TypeError) as e:
        raise BufferCorruptError(f"buffer checkpoint manifest {manifest_path} is unreadable: {e!r}") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise BufferCorruptError(f"{manifest_path}: format {manifest.get('format')}, expected {FORMAT_VERSION}")
    groups = _read_arrow(path, files["groups"])
    if len(groups) != len(meta):
        file = os.path.join(path, files["groups"]["name"])
        raise BufferCorruptError(f"{file}: {len(groups)} groups, manifest lists {len(meta)}")
    return Snapshot(groups, meta, _read_arrow(path, files["pending"]), counters)


def _write_arrow(path: str, name: str, batches: list[pa.RecordBatch]) -> dict:
    tmp = os.path.join(path, name + ".tmp")
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, ROLLOUT_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
    _fsync(tmp)
    final = os.path.join(path, name)
    os.replace(tmp, final)
    return {"name": name, "bytes": os.path.getsize(final), "sha256": _sha256(final), "batches": len(batches)}


def _read_arrow(path: str, info: dict) -> list[pa.RecordBatch]:
    file = os.path.join(path, info["name"])
    if not os.path.exists(file):
        raise BufferCorruptError(f"buffer checkpoint file {file} is missing (listed in {MANIFEST})")
    with open(file, "rb") as f:
        data = f.read()  # one read serves the checks and the parse; the batches then own their memory
    if len(data) != info["bytes"]:
        raise BufferCorruptError(
            f"buffer checkpoint file {file} is truncated or altered: {len(data)} bytes, expected {info['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise BufferCorruptError(f"buffer checkpoint file {file} fails its sha256 check: corrupt")
    try:
        reader = pa.ipc.open_file(pa.py_buffer(data))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, OSError) as e:
        raise BufferCorruptError(f"buffer checkpoint file {file} is not a readable Arrow IPC file: {e}") from e
    if not reader.schema.equals(ROLLOUT_SCHEMA) or len(batches) != info["batches"]:
        raise BufferCorruptError(f"buffer checkpoint file {file}: schema or batch count differs from the manifest")
    return batches


def _atomic_write(final: str, data: bytes) -> None:
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _fsync(file: str) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
