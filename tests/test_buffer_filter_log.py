"""buffer.filter (DAPO dynamic sampling) and the rollout log (every stored group, for launch.export)."""
from __future__ import annotations

import math
import os

import pyarrow as pa
import pytest

from buffer import BufferConfig, ReplayBuffer, rollouts_to_arrow
from buffer.rollout_log import ROLLED_BACK, read_log, segments
from buffer.schema import ROLLOUT_SCHEMA
from buffer.testing import fake_batch, fake_group

pytestmark = pytest.mark.timeout(60)


def test_zero_variance_drops_only_equal_reward_groups_and_counts_them():
    buf = ReplayBuffer(BufferConfig(filter="zero_variance", max_staleness=10), groups_per_step=1)
    batch = rollouts_to_arrow(fake_group("all1", rewards=[1.0] * 4) + fake_group("all0", rewards=[0.0] * 4)
                              + fake_group("mixed", rewards=[0.0, 1.0, 1.0, 1.0])
                              + fake_group("nan", rewards=[math.nan] * 4))
    assert buf.put(batch, request_id="r0") == 2  # mixed and nan (NaN is never "all equal") are kept
    s = buf.stats()
    assert (s["filtered_zero_variance"], s["filter_checked"], s["filter_rate"]) == (2, 4, 0.5)
    assert buf.ledger()["requests"]["r0"]["filtered"] == 2
    assert sorted(buf.ledger()["held_group_ids"]) == ["mixed", "nan"]


def test_filter_none_keeps_equal_reward_groups():
    buf = ReplayBuffer(BufferConfig(max_staleness=10), groups_per_step=1)
    assert buf.put(fake_batch(["a"], rewards=[1.0] * 4), request_id="r") == 1
    assert buf.stats()["filtered_zero_variance"] == 0 and buf.ledger()["requests"]["r"]["filtered"] == 0


def test_filtered_group_gives_its_admission_slot_back():
    buf = ReplayBuffer(BufferConfig(filter="zero_variance", max_staleness=0), groups_per_step=2)
    assert buf.try_admit(2, 0) and not buf.try_admit(1, 0)  # the step's window is full
    buf.put(fake_batch(["same"], rewards=[0.5] * 4))  # filtered: its slot returns, so one more prompt may start
    assert buf.try_admit(1, 0) and not buf.try_admit(1, 0)
    assert buf.stats()["released"] == 1


def test_offline_groups_are_not_filtered(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_batches([fake_batch(["o"], rewards=[1.0] * 4)]), tmp_path / "o.parquet")
    buf = ReplayBuffer(BufferConfig(filter="zero_variance"), groups_per_step=1)
    assert buf.load_offline(str(tmp_path / "o.parquet")) == 1
    assert buf.stats()["filter_checked"] == 0


def test_filter_counters_survive_save_and_load(tmp_path):
    cfg = BufferConfig(filter="zero_variance", max_staleness=10)
    buf = ReplayBuffer(cfg, groups_per_step=1, run_dir=str(tmp_path))
    buf.put(fake_batch(["x", "y"], rewards=[2.0] * 4), request_id="r")
    buf.save()
    back = ReplayBuffer(cfg, groups_per_step=1, run_dir=str(tmp_path))
    back.load()
    assert back.stats()["filtered_zero_variance"] == 2 and back.ledger()["requests"]["r"]["filtered"] == 2


def test_rollout_log_keeps_every_stored_group_after_it_left_the_buffer(tmp_path):
    buf = ReplayBuffer(BufferConfig(filter="zero_variance", max_staleness=0, capacity_groups=2), groups_per_step=1,
                       run_dir=str(tmp_path))
    buf.put(fake_batch(["a", "b"]))
    assert buf.sample(1, 0, timeout=1) is not None  # a leaves (max_reuse 1)
    buf.put(fake_batch(["c", "d"]))  # capacity 2: b is evicted unsampled
    buf.put(fake_batch(["flat"], rewards=[1.0] * 4))  # filtered: never stored, never logged
    buf.put(fake_batch(["old"], policy_version=-5))  # stale at put: never stored, never logged
    log = read_log(str(tmp_path / "rollouts"))
    assert list(dict.fromkeys(log.column("group_id").to_pylist())) == ["a", "b", "c", "d"]
    assert log.num_rows == 16 and log.schema.equals(ROLLOUT_SCHEMA)
    assert buf.stats()["size_groups"] == 2  # the buffer itself holds only c and d


def test_rollout_log_off_and_without_run_dir(tmp_path):
    ReplayBuffer(BufferConfig(rollout_log=False), 1, run_dir=str(tmp_path)).put(fake_batch(["a"]))
    ReplayBuffer(BufferConfig(), 1).put(fake_batch(["a"]))
    assert not (tmp_path / "rollouts").exists()


def test_resume_rolls_back_groups_logged_after_the_checkpoint(tmp_path):
    cfg = BufferConfig(max_staleness=10)
    buf = ReplayBuffer(cfg, groups_per_step=1, run_dir=str(tmp_path))
    buf.put(fake_batch(["before"]), request_id="r0")
    buf.save(str(tmp_path / "ckpt"))
    buf.put(fake_batch(["after"]), request_id="r1")  # the run dies before its next checkpoint
    resumed = ReplayBuffer(cfg, groups_per_step=1, run_dir=str(tmp_path))
    resumed.load(str(tmp_path / "ckpt"))  # r1 is not recorded: the launcher re-issues it
    resumed.put(fake_batch(["again"]), request_id="r1")
    log = read_log(str(tmp_path / "rollouts"))
    assert list(dict.fromkeys(log.column("group_id").to_pylist())) == ["before", "again"]
    assert any(n.endswith(ROLLED_BACK) for n in os.listdir(tmp_path / "rollouts"))


def test_torn_log_keeps_the_groups_before_the_tear(tmp_path):
    buf = ReplayBuffer(BufferConfig(max_staleness=10), groups_per_step=1, run_dir=str(tmp_path))
    buf.put(fake_batch(["a"]))
    buf.put(fake_batch(["b"]))
    path = tmp_path / "rollouts" / segments(str(tmp_path / "rollouts"))[0]
    path.write_bytes(path.read_bytes()[:-40])  # the process died inside b's message
    with pytest.warns(UserWarning, match="torn after 1 groups"):
        log = read_log(str(tmp_path / "rollouts"))
    assert log.column("group_id").to_pylist() == ["a"] * 4


def test_ledger_accounts_filtered_groups_as_filtered_not_lost():
    from collections import Counter

    from launch.ledger import ledger

    buf = ReplayBuffer(BufferConfig(filter="zero_variance", max_staleness=10), groups_per_step=2)
    assert buf.try_admit(4, 0)
    buf.put(fake_batch(["a", "b"]), request_id="r0")
    buf.put(fake_batch(["flat1", "flat2"], rewards=[1.0] * 4), request_id="r1")
    trained = Counter({gid: 1 for gid in buf.sample(2, 0, timeout=1).column("group_id").unique().to_pylist()})
    out = ledger(4, 2, 0, 0, trained, buf.ledger(), buf.stats(), max_reuse=1)
    # 4 dispatched = 2 trained + 2 filtered
    assert (out["groups_filtered"], out["groups_trained"], out["groups_lost"]) == (2, 2, 0)
    assert ledger(5, 2, 0, 0, trained, buf.ledger(), buf.stats(), max_reuse=1)["groups_lost"] == 1
