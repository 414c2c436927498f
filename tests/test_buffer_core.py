"""ReplayBuffer without Ray: schema, group integrity, samplers, reuse, capacity, staleness drops."""
from __future__ import annotations

import collections
import pickle

import pyarrow as pa
import pydantic
import pytest

from buffer import BufferConfig, ReplayBuffer, rollout_batch, rollouts_from_arrow, rollouts_to_arrow
from buffer.schema import FIELDS, RequestRows
from buffer.testing import fake_batch, fake_group

pytestmark = pytest.mark.timeout(60)


def group_ids(batch: pa.RecordBatch) -> list[str]:
    """Group ids in serving order, checking rows of a group are contiguous and complete."""
    ids = batch.column("group_id").to_pylist()
    order = list(dict.fromkeys(ids))
    sizes = batch.column("group_size").to_pylist()
    pos = 0
    for gid in order:
        n = ids.count(gid)
        assert ids[pos : pos + n] == [gid] * n, "rows of a group must be contiguous"
        assert n == sizes[pos], f"group {gid} served with {n} of {sizes[pos]} rows"
        pos += n
    return order


def test_schema_round_trip():
    rows = fake_group("g0", group_size=3, policy_version=5)
    back = rollouts_from_arrow(rollouts_to_arrow(rows))
    assert back == rows
    assert back[0].token_versions == [5] * 8


def test_rows_given_as_columns_make_the_batch_rollouts_make():
    """The generator builds its batch from columns (rollout_batch), every other writer from Rollouts: one schema,
    one set of row checks, and the same bytes either way."""
    rows = fake_group("g0", group_size=3, policy_version=5) + fake_group("g1", group_size=3, response_len=2)
    columns = {name: [getattr(r, name) for r in rows] for name in FIELDS}
    columns["token_versions"] = [[] for _ in rows]  # left to the policy version, as a Rollout fills them
    assert rollout_batch(columns).equals(rollouts_to_arrow(rows))
    short = {**columns, "behaviour_logprobs": [lps[:-1] for lps in columns["behaviour_logprobs"]]}
    with pytest.raises(ValueError, match="g0/0: 7 behaviour log-probs for 8 response tokens"):
        rollout_batch(short)
    with pytest.raises(ValueError, match="token versions"):
        rollout_batch({**columns, "token_versions": [[1]] * len(rows)})
    with pytest.raises(ValueError, match="schema"):
        rollout_batch({k: v for k, v in columns.items() if k != "reward"})
    with pytest.raises(ValueError, match="unequal"):
        rollout_batch({**columns, "reward": columns["reward"][:-1]})


def test_put_validates_schema():
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    batch = fake_batch(["a"])
    with pytest.raises(ValueError, match="reward"):
        buf.put(batch.drop_columns(["reward"]))
    assert buf.put(pa.Table.from_batches([batch])) == 1  # a table is accepted too


def test_put_rows_stores_a_request_once_and_refuses_rows_a_judge_has_not_scored():
    """What a rollout request hands on (`RequestRows`, the actor's second return value): stored under its request id
    with its skips in the ledger, a second copy refused; rows still waiting for a judge never enter."""
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    assert buf.put_rows(RequestRows(fake_batch(["a", "b"]), {"prompt_empty": 1}), "r0") == 2
    assert buf.put_rows(RequestRows(fake_batch(["c"])), "r0") == -1  # a re-issued copy
    assert buf.put_rows(RequestRows(None, {"prompt_too_long": 3}), "r1") == 0  # every group skipped
    requests = buf.ledger()["requests"]
    assert requests["r0"]["skipped"] == {"prompt_empty": 1} and requests["r1"] == {
        "stored": 0, "skipped": {"prompt_too_long": 3}, "filtered": 0}
    with pytest.raises(ValueError, match="judge"):
        buf.put_rows(RequestRows(fake_batch(["d"]), {}, judge_work=["pending"]), "r2")
    assert not buf.has_request("r2") and buf.stats()["size_groups"] == 2


def test_put_rows_reads_the_bytes_a_rollout_actor_returns():
    """A rollout actor returns its rows as one bytes value (common/wire.py): the buffer stores the same rows from it,
    and anything else sent as rows is refused by name."""
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    sent = fake_batch(["a", "b"])
    assert buf.put_rows(RequestRows(sent, {"prompt_empty": 1}).to_bytes(), "r0") == 2
    assert buf.ledger()["requests"]["r0"]["skipped"] == {"prompt_empty": 1}
    assert buf.sample(2, 0).to_pylist() == pa.Table.from_batches([sent]).sort_by("group_id").to_pylist()
    with pytest.raises(TypeError, match="expected a RequestRows"):
        buf.put_rows(pickle.dumps({"batch": sent}), "r1")
    assert not buf.has_request("r1")


def test_incomplete_group_never_served():
    buf = ReplayBuffer(BufferConfig(max_staleness=10), groups_per_step=1)
    rows = fake_group("a", group_size=4)
    assert buf.put(rollouts_to_arrow(rows[:3])) == 0
    assert buf.sample(1, 0, timeout=0.05) is None
    assert buf.stats()["pending_rollouts"] == 3
    # Interleaved rows of two groups: the second one completes, the first still waits.
    assert buf.put(rollouts_to_arrow([fake_group("b")[0], rows[3]] + fake_group("b")[1:])) == 2
    assert group_ids(buf.sample(2, 0, timeout=1)) in (["a", "b"], ["b", "a"])


def test_inconsistent_groups_raise():
    buf = ReplayBuffer(BufferConfig(), groups_per_step=1)
    rows = fake_group("a", group_size=2)
    with pytest.raises(ValueError, match="duplicate rollout_id"):
        buf.put(rollouts_to_arrow([rows[0], rows[0]]))
    buf.put(rollouts_to_arrow(rows))
    with pytest.raises(ValueError, match="already complete"):
        buf.put(rollouts_to_arrow(rows[:1]))


def test_fifo_order_and_reuse():
    buf = ReplayBuffer(BufferConfig(sampler="fifo", max_reuse=2, max_staleness=5), groups_per_step=2)
    buf.put(fake_batch(["a", "b", "c"]))
    assert group_ids(buf.sample(2, 0, timeout=1)) == ["a", "b"]
    assert group_ids(buf.sample(2, 0, timeout=1)) == ["c", "a"]  # every group once before any twice
    assert group_ids(buf.sample(2, 0, timeout=1)) == ["b", "c"]
    assert buf.sample(1, 0, timeout=0.01) is None  # all served max_reuse times and gone
    assert buf.stats()["size_groups"] == 0


def test_uniform_sampler_is_uniform():
    buf = ReplayBuffer(BufferConfig(sampler="uniform", max_reuse=10**6, seed=1), groups_per_step=1)
    k = 8
    buf.put(fake_batch([f"g{i}" for i in range(k)]))
    counts = collections.Counter(gid for _ in range(4000) for gid in group_ids(buf.sample(2, 0, timeout=1)))
    expected = 8000 / k
    chi2 = sum((counts[f"g{i}"] - expected) ** 2 / expected for i in range(k))
    assert chi2 < 24.3  # p = 0.001 for 7 degrees of freedom


@pytest.mark.parametrize("priority", ["recency", "advantage"])
def test_prioritized_sampler_prefers_high_priority(priority):
    cfg = BufferConfig(sampler="prioritized", priority=priority, priority_exponent=1.0, max_reuse=10**6, seed=2)
    buf = ReplayBuffer(cfg, groups_per_step=1)
    # Group k has arrival rank k+1 and |advantage| k/2: both scores rise with k.
    for k in range(4):
        buf.put(fake_batch([f"g{k}"], group_size=2, rewards=[0.0, float(k)]))
    counts = collections.Counter(gid for _ in range(6000) for gid in group_ids(buf.sample(1, 0, timeout=1)))
    freq = [counts[f"g{k}"] / 6000 for k in range(4)]
    eps = cfg.priority_eps
    scores = [k + 1 for k in range(4)] if priority == "recency" else [k / 2 for k in range(4)]
    expected = [(s + eps) / sum(x + eps for x in scores) for s in scores]
    assert freq == pytest.approx(expected, abs=0.025)


def test_capacity_fifo_eviction_counts_unsampled():
    buf = ReplayBuffer(BufferConfig(capacity_groups=3, max_staleness=10), groups_per_step=1)
    buf.put(fake_batch(["a", "b"]))
    buf.sample(1, 0)  # serves and removes a
    buf.put(fake_batch(["c", "d", "e"]))  # b is evicted unsampled
    stats = buf.stats()
    assert stats["size_groups"] == 3 and stats["drops_evicted_unsampled"] == 1
    assert group_ids(buf.sample(3, 0, timeout=1)) == ["c", "d", "e"]


def test_oldest_version_eviction_and_byte_capacity():
    one_group_bytes = fake_batch(["xyz"]).nbytes
    cfg = BufferConfig(eviction="oldest_version", capacity_bytes=2 * one_group_bytes, max_staleness=10)
    buf = ReplayBuffer(cfg, groups_per_step=1)
    buf.put(fake_batch(["new"], policy_version=3))
    buf.put(fake_batch(["old"], policy_version=1))
    buf.put(fake_batch(["mid"], policy_version=2))  # over the byte bound: "old" leaves although newest-but-one
    assert buf.stats()["bytes"] <= 2 * one_group_bytes
    assert sorted(group_ids(buf.sample(2, 3, timeout=1))) == ["mid", "new"]


def test_groups_of_one_put_count_their_rows_share_of_its_bytes():
    """Groups stored as slices of one put's batch count its bytes by their rows (buffer.groups.row_bytes), in
    all and as they leave: what capacity_bytes bounds."""
    buf = ReplayBuffer(BufferConfig(capacity_groups=3, max_staleness=10), groups_per_step=1)
    batch, late = fake_batch(["a", "b", "c"]), fake_batch(["d"])
    buf.put(batch)
    assert abs(buf.stats()["bytes"] - batch.nbytes) <= 3  # each group's share, rounded to a byte
    buf.put(late)  # "a" is evicted: its third of the first batch leaves with it
    assert abs(buf.stats()["bytes"] - (2 * batch.nbytes / 3 + late.nbytes)) <= 3


@pytest.mark.parametrize("eviction, kept", [("fifo", ["v1", "x", "y"]), ("oldest_version", ["v2", "x", "y"])])
def test_one_put_evicting_several_groups_evicts_them_in_order(eviction, kept):
    """A put that overflows by several groups evicts them in the eviction order (sorted once per put)."""
    buf = ReplayBuffer(BufferConfig(capacity_groups=3, eviction=eviction, max_staleness=10), groups_per_step=1)
    for gid, version in (("v2", 2), ("v0", 0), ("v1", 1)):
        buf.put(fake_batch([gid], policy_version=version))
    buf.put(fake_batch(["x", "y"], policy_version=3))  # two groups must leave
    assert buf.stats()["drops_evicted_unsampled"] == 2
    assert sorted(group_ids(buf.sample(3, 3, timeout=1))) == kept


def test_drop_policy_counts_stale_groups():
    buf = ReplayBuffer(BufferConfig(staleness_policy="drop", max_staleness=1), groups_per_step=1)
    assert all(buf.try_admit(100, 0) for _ in range(3))  # no admission control under "drop"
    buf.put(fake_batch(["v0"], policy_version=0))
    buf.put(fake_batch(["v2"], policy_version=2))
    assert buf.try_admit(0, 3)  # the learner reached step 3
    buf.put(fake_batch(["v1"], policy_version=1))  # 2 versions behind on arrival
    assert group_ids(buf.sample(1, 3, timeout=1)) == ["v2"]
    stats = buf.stats()
    assert stats["drops_stale_at_put"] == 1 and stats["drops_stale_at_sample"] == 1
    assert stats["staleness_hist_1"] == 1


def test_config_rejects_invalid_combinations():
    with pytest.raises(pydantic.ValidationError):
        BufferConfig(samples_per_insert=2.0, max_reuse=1)
    with pytest.raises(pydantic.ValidationError):
        BufferConfig(min_size_groups=8, capacity_groups=4)
    with pytest.raises(pydantic.ValidationError):
        BufferConfig(max_staleness=-1)
    with pytest.raises(pydantic.ValidationError):
        BufferConfig(capacity=3)  # unknown key
    with pytest.raises(ValueError, match="spi_tolerance"):
        ReplayBuffer(BufferConfig(samples_per_insert=1.0, spi_tolerance=1.0), groups_per_step=8)


def test_fifo_serves_the_oldest_behaviour_version_first():
    """Groups from several actors arrive out of admission order; the stalest is served first so it stays in bound."""
    buf = ReplayBuffer(BufferConfig(sampler="fifo", max_staleness=2), groups_per_step=1)
    buf.put(fake_batch(["new"], policy_version=3))
    buf.put(fake_batch(["old"], policy_version=1))
    buf.put(fake_batch(["mid"], policy_version=2))
    assert [group_ids(buf.sample(1, 3, timeout=1)) for _ in range(3)] == [["old"], ["mid"], ["new"]]
    assert buf.stats()["drops_stale_at_sample"] == 0
