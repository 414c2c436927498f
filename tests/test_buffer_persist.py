"""save/load round trips, damaged checkpoints, and offline data from Parquet and JSONL."""
from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffer import BufferConfig, BufferCorruptError, ReplayBuffer, missing_behaviour_logprobs, rollouts_from_arrow
from buffer.offline import OFFLINE_POLICY_VERSION
from buffer.testing import fake_batch, fake_group

pytestmark = pytest.mark.timeout(60)


def filled_buffer(run_dir: str) -> ReplayBuffer:
    buf = ReplayBuffer(BufferConfig(max_staleness=2, max_reuse=2), groups_per_step=2, run_dir=run_dir)
    assert buf.try_admit(5, 0)
    buf.put(fake_batch(["a", "b", "c"], policy_version=0))
    buf.put(fake_batch(["d"], policy_version=1)[:2])  # half a group stays pending
    buf.sample(2, 1, timeout=1)  # a and b served once, stay for a second use
    return buf


def drain(buf: ReplayBuffer, version: int) -> list:
    out = []
    while (batch := buf.sample(1, version, timeout=0.05)) is not None:
        out.extend(rollouts_from_arrow(batch))
    return out


def test_save_load_restores_groups_counters_and_pending(tmp_path):
    buf = filled_buffer(str(tmp_path))
    buf.save()  # default: run_dir/buffer
    restored = ReplayBuffer(BufferConfig(max_staleness=2, max_reuse=2), groups_per_step=2, run_dir=str(tmp_path))
    restored.load()
    keys = ["size_groups", "size_rollouts", "bytes", "pending_rollouts", "admitted", "inserts", "samples",
            "learner_version", "staleness_hist_1"]
    assert {k: restored.stats()[k] for k in keys} == {k: buf.stats()[k] for k in keys}
    assert restored.try_admit(3, 1) and not restored.try_admit(1, 1)  # (1 + 2 + 1) * 2 - 5 admitted
    # The pending half-group completes after the restore.
    restored.put(fake_batch(["d"], policy_version=1)[2:])
    buf.put(fake_batch(["d"], policy_version=1)[2:])
    assert drain(restored, 1) == drain(buf, 1)


def test_save_replaces_previous_checkpoint_atomically(tmp_path):
    buf = filled_buffer(str(tmp_path))
    path = str(tmp_path / "ckpt")
    buf.save(path)
    first = sorted(os.listdir(path))
    buf.put(fake_batch(["e"], policy_version=1))
    buf.save(path)
    files = sorted(os.listdir(path))
    assert len(files) == len(first) == 3 and files != first  # new generation, old files removed
    assert not [f for f in files if f.endswith(".tmp")]
    restored = ReplayBuffer(BufferConfig(max_staleness=2, max_reuse=2), groups_per_step=2)
    restored.load(path)
    assert restored.stats()["size_groups"] == buf.stats()["size_groups"]


def groups_file(path: str) -> str:
    return os.path.join(path, next(f for f in os.listdir(path) if f.startswith("groups-")))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_reported_naming_the_file(tmp_path, damage):
    buf = filled_buffer(str(tmp_path))
    path = str(tmp_path / "ckpt")
    buf.save(path)
    target = groups_file(path)
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    elif damage == "flip":
        with open(target, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete":
        os.remove(target)
    else:
        target = os.path.join(path, "manifest.json")
        with open(target, "w") as f:
            f.write('{"format": 1, "files": ')
    fresh = ReplayBuffer(BufferConfig(max_staleness=2, max_reuse=2), groups_per_step=2)
    fresh.put(fake_batch(["kept"]))
    with pytest.raises(BufferCorruptError, match=os.path.basename(target)):
        fresh.load(path)
    assert fresh.stats()["size_groups"] == 1  # a failed load changes nothing


def test_load_without_checkpoint_is_file_not_found(tmp_path):
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        buf.load(str(tmp_path / "nothing"))


def test_offline_parquet_with_logprobs(tmp_path):
    rows = fake_group("p0", group_size=3, policy_version=7) + fake_group("p1", group_size=3, policy_version=7)
    table = fake_batch(["p0", "p1"], group_size=3, policy_version=7)
    pq.write_table(pa.Table.from_batches([table]), tmp_path / "d.parquet")
    buf = ReplayBuffer(BufferConfig(max_staleness=0), groups_per_step=1)
    assert buf.try_admit(0, 50)  # the learner is far ahead: offline groups are exempt from the staleness bound
    assert buf.load_offline(str(tmp_path / "d.parquet")) == 2
    got = rollouts_from_arrow(buf.sample(2, 50, timeout=1))
    assert sorted(got, key=lambda r: r.rollout_id) == sorted(rows, key=lambda r: r.rollout_id)
    assert buf.stats()["served_offline"] == 2 and buf.stats()["admitted"] == 0


def test_offline_jsonl_without_logprobs_marks_them_nan(tmp_path):
    lines = [
        {"prompt_id": "q1", "token_ids": [1, 2, 3, 4], "prompt_len": 2, "reward": 1.0},
        {"prompt_id": "q2", "token_ids": [5, 6, 7], "prompt_len": 1, "reward": 0.0},
        {"prompt_id": "q1", "token_ids": [1, 2, 9], "prompt_len": 2, "reward": 0.0},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    assert buf.load_offline(str(tmp_path)) == 2  # a directory: every .jsonl/.parquet in it
    batch = buf.sample(2, 0, timeout=1)
    assert all(missing_behaviour_logprobs(batch))
    got = rollouts_from_arrow(batch)
    assert [r.group_size for r in got] == [2, 2, 1]  # q1's two rows contiguous, then q2
    assert [r.prompt_id for r in got] == ["q1", "q1", "q2"]
    assert all(math.isnan(x) for r in got for x in r.behaviour_logprobs)
    assert [len(r.behaviour_logprobs) for r in got] == [2, 1, 2]
    assert {r.policy_version for r in got} == {OFFLINE_POLICY_VERSION}


def test_offline_bad_row_names_file_and_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_id": "q", "token_ids": [1], "prompt_len": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 0: missing \['reward'\]"):
        ReplayBuffer(BufferConfig(), groups_per_step=1).load_offline(str(tmp_path / "bad.jsonl"))
