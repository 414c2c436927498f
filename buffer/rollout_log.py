"""The run's rollout log: every group the buffer stored, appended to Arrow IPC stream files under run_dir/rollouts/.

The buffer itself forgets: groups leave when served max_reuse times, go stale or are evicted, and a checkpoint
holds only what is in the buffer at that moment. The log keeps every group the buffer *accepted* (stored: not
dropped stale at put, not filtered), so `python -m launch.export` can write the whole run as offline data.

Layout: `segment-<gen>.arrows`, one Arrow IPC *stream* per segment (a stream can be appended to batch by batch;
a crash tears at most the last message, and read_log keeps everything before it). A buffer checkpoint seals
the open segment and lists the sealed ones; a resume from that checkpoint renames every segment it does not
list to `*.rolled_back`: their requests are not recorded by the restored buffer, so they are generated again.
"""
from __future__ import annotations

import os
import time
import warnings

import pyarrow as pa

from buffer.schema import ROLLOUT_SCHEMA

SUFFIX = ".arrows"
ROLLED_BACK = ".rolled_back"


class RolloutLog:
    """Appends stored groups to the open segment; not thread-safe (the buffer calls it under its lock)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._name: str | None = None

    def append(self, group: pa.RecordBatch) -> None:
        if self._writer is None:
            os.makedirs(self.directory, exist_ok=True)
            self._name = f"segment-{time.time_ns()}-{os.getpid()}{SUFFIX}"
            self._sink = pa.OSFile(os.path.join(self.directory, self._name), "wb")
            self._writer = pa.ipc.new_stream(self._sink, ROLLOUT_SCHEMA)
        self._writer.write_batch(group)
        self._sink.flush()  # into the OS: a dead buffer process loses nothing it acknowledged

    def seal(self) -> list[str]:
        """Close the open segment; returns the names of every segment in the log (a checkpoint keeps them)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = self._name = None
        return segments(self.directory)

    def roll_back_to(self, kept: list[str]) -> list[str]:
        """Resume: segments a checkpoint did not list hold groups the restored run will generate again."""
        self.seal()
        gone = [name for name in segments(self.directory) if name not in set(kept)]
        for name in gone:
            path = os.path.join(self.directory, name)
            os.replace(path, path + ROLLED_BACK)
        return gone


def segments(directory: str) -> list[str]:
    """Segment file names in write order (their names start with the time they were opened)."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.startswith("segment-") and n.endswith(SUFFIX)]
    return sorted(names, key=lambda n: (int(n.split("-")[1]), n))


def read_log(directory: str) -> pa.Table:
    """Every logged group, in the order stored, as one table with ROLLOUT_SCHEMA (empty if there are none).

    A segment whose last message is torn (the process died mid-write) yields the groups before it, with a warning."""
    batches: list[pa.RecordBatch] = []
    for name in segments(directory):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()  # the batches then own their memory (no map left open behind them)
        if not data:
            continue  # opened, nothing written yet
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(data))
        except pa.ArrowInvalid as e:
            warnings.warn(f"rollout log {path}: unreadable header, skipped ({e})", stacklevel=2)
            continue
        if not reader.schema.equals(ROLLOUT_SCHEMA):
            raise ValueError(f"rollout log {path}: schema differs from ROLLOUT_SCHEMA (written by another version?)")
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as e:
                warnings.warn(f"rollout log {path}: torn after {len(batches)} groups, rest skipped ({e})", stacklevel=2)
                break
    return pa.Table.from_batches(batches, ROLLOUT_SCHEMA)
