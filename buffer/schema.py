"""The one Rollout record: made by actors, stored by the buffer, read by the learner.

One row is one generation (a prompt plus one sampled response). A *group* is the
n generations sampled for the same prompt occurrence; group-relative objectives
(GRPO, AGRO, REINFORCE with a group baseline) need every member of a group, so
the buffer only ever serves whole groups.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pyarrow as pa

from common.wire import Packed

SCHEMA_VERSION = 2  # bump when a field is added, removed or changes meaning; written into exported files

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("rollout_id", pa.string(), nullable=False),  # unique per generation
        pa.field("prompt_id", pa.string(), nullable=False),  # the data set's id of the prompt
        pa.field("group_id", pa.string(), nullable=False),  # unique per (prompt, sampling occurrence)
        pa.field("group_size", pa.int32(), nullable=False),  # n: members the group must have
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # (prompt_len + T,)
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),  # (T,) under the sampling distribution
        pa.field("token_versions", pa.list_(pa.int64()), nullable=False),  # (T,) policy version per response token
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),  # oldest version that produced a token
        pa.field("generator_id", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length" | "abort"
        pa.field("t_start", pa.float64(), nullable=False),  # unix time sampling started
        pa.field("t_end", pa.float64(), nullable=False),  # unix time the reward was computed
        pa.field("response_text", pa.string(), nullable=False),
        pa.field("reward_info", pa.string(), nullable=False),  # "" or why the reward is what it is (e.g. "nan")
        pa.field("data_source", pa.string(), nullable=False),  # the row's source tag (dataset, task); "" if none
    ]
)


@dataclass
class Rollout:
    """One generation with everything an off-policy objective needs to learn from it."""

    rollout_id: str
    prompt_id: str
    group_id: str
    group_size: int
    token_ids: list[int]  # (prompt_len + T,) prompt then response
    prompt_len: int
    behaviour_logprobs: list[float]  # (T,) log mu(y_t | ...) under the distribution actually sampled
    reward: float
    policy_version: int
    generator_id: str
    finish_reason: str
    t_start: float
    t_end: float
    response_text: str = ""
    reward_info: str = ""
    token_versions: list[int] = field(default_factory=list)  # (T,); filled from policy_version if empty
    data_source: str = ""  # which dataset/task the prompt came from: routes rewards, splits metrics, tags exports

    def __post_init__(self) -> None:
        self.token_versions = checked_versions(self.rollout_id, len(self.token_ids), self.prompt_len,
                                               len(self.behaviour_logprobs), self.token_versions, self.policy_version)

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


def checked_versions(rollout_id: str, n_tokens: int, prompt_len: int, n_logprobs: int, token_versions: list[int],
                     policy_version: int) -> list[int]:
    """What makes a row whole: a prompt within its tokens, one behaviour log-prob and one version per response
    token. Returns the row's token versions, every token at `policy_version` when none are given."""
    n_resp = n_tokens - prompt_len
    if prompt_len < 0 or n_resp < 0:
        raise ValueError(f"rollout {rollout_id}: prompt_len {prompt_len} > {n_tokens} tokens")
    if n_logprobs != n_resp:
        raise ValueError(f"rollout {rollout_id}: {n_logprobs} behaviour log-probs for {n_resp} response tokens")
    if not token_versions:
        return [policy_version] * n_resp
    if len(token_versions) != n_resp:
        raise ValueError(f"rollout {rollout_id}: {len(token_versions)} token versions for {n_resp} tokens")
    return token_versions


FIELDS = [f.name for f in ROLLOUT_SCHEMA]
assert sorted(FIELDS) == sorted(f.name for f in dataclasses.fields(Rollout)), "schema and dataclass disagree"


def rollout_batch(columns: dict[str, list]) -> pa.RecordBatch:
    """Rows held as columns (one list per field of ROLLOUT_SCHEMA, row i at index i of each) to one record batch,
    each row checked and completed as `Rollout` does it. For a writer that makes many rows at once (the generator):
    a Rollout object per row, then taking the objects apart again into columns, cost the rollout path ~0.3 ms a
    request."""
    if sorted(columns) != sorted(FIELDS):
        raise ValueError(f"rollout columns {sorted(columns)} are not the schema's {sorted(FIELDS)}")
    if len({len(c) for c in columns.values()}) > 1:
        raise ValueError(f"rollout columns of unequal lengths: { {k: len(c) for k, c in columns.items()} }")
    versions = [checked_versions(rid, len(ids), p_len, len(lps), token_versions, version)
                for rid, ids, p_len, lps, token_versions, version
                in zip(columns["rollout_id"], columns["token_ids"], columns["prompt_len"],
                       columns["behaviour_logprobs"], columns["token_versions"], columns["policy_version"])]
    return pa.RecordBatch.from_pydict({**columns, "token_versions": versions}, schema=ROLLOUT_SCHEMA)


@dataclass
class RequestRows(Packed):
    """What one rollout request hands on to be stored: its whole groups as one record batch (None when every group
    was skipped), the groups it skipped by reason (the request's ledger entry), and the groups a judge service must
    score first (`actors.judge.JudgeWork`, opaque here: the buffer refuses rows that still wait for a judge). A rollout
    actor returns it as bytes (`to_bytes`, common/wire.py); `RequestRows.of` reads either form."""

    batch: pa.RecordBatch | None
    skipped: dict[str, int] = field(default_factory=dict)
    judge_work: list = field(default_factory=list)

    def __reduce__(self):
        # the batch as one Arrow IPC buffer, read back zero-copy: pickling the RecordBatch itself hands Ray one
        # buffer per column buffer (28 for a request), which cost the rollout actor more than the bytes do
        return _request_rows, (None if self.batch is None else _ipc_buffer(self.batch), self.skipped, self.judge_work)


def _ipc_buffer(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _request_rows(buffer: pa.Buffer | None, skipped: dict[str, int], judge_work: list) -> RequestRows:
    return RequestRows(None if buffer is None else pa.ipc.open_stream(buffer).read_next_batch(), skipped, judge_work)


def rollouts_to_arrow(rollouts: list[Rollout]) -> pa.RecordBatch:
    """Rows to one record batch against ROLLOUT_SCHEMA (raises on a type mismatch)."""
    columns = {name: [getattr(r, name) for r in rollouts] for name in FIELDS}
    return pa.RecordBatch.from_pydict(columns, schema=ROLLOUT_SCHEMA)


def rollouts_from_arrow(data: pa.RecordBatch | pa.Table) -> list[Rollout]:
    """A batch or table with ROLLOUT_SCHEMA back to rows."""
    if not data.schema.equals(ROLLOUT_SCHEMA):
        data = data.select(FIELDS).cast(ROLLOUT_SCHEMA)
    return [Rollout(**row) for row in data.to_pylist()]


def missing_behaviour_logprobs(data: pa.RecordBatch | pa.Table) -> list[bool]:
    """Per row: whether its behaviour log-probs are unknown (NaN), e.g. offline data without them.

    The learner must replace such rows' behaviour_logprobs by log-probs it recomputes, (T,) each,
    before an importance ratio is formed; see buffer/offline.py.
    """
    import pyarrow.compute as pc

    col = data.column("behaviour_logprobs")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    nan = pc.is_nan(pc.list_flatten(col)).to_pylist()
    parents = pc.list_parent_indices(col).to_pylist()
    out = [False] * len(col)
    for row, is_nan in zip(parents, nan):
        out[row] = out[row] or is_nan
    return out
