"""Fake rollouts for tests and benchmarks: whole groups with the real schema, no model needed."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from buffer.schema import ROLLOUT_SCHEMA, Rollout, rollouts_to_arrow


def fake_group(
    group_id: str,
    group_size: int = 4,
    policy_version: int = 0,
    response_len: int = 8,
    prompt_len: int = 4,
    rewards: list[float] | None = None,
    generator_id: str = "fake",
) -> list[Rollout]:
    """group_size rollouts of one prompt; rollout ids are '<group_id>/<k>'."""
    rewards = rewards if rewards is not None else [float(k % 2) for k in range(group_size)]
    return [
        Rollout(
            rollout_id=f"{group_id}/{k}",
            prompt_id=f"prompt-{group_id}",
            group_id=group_id,
            group_size=group_size,
            token_ids=list(range(prompt_len + response_len)),
            prompt_len=prompt_len,
            behaviour_logprobs=[-0.5] * response_len,
            reward=rewards[k],
            policy_version=policy_version,
            generator_id=generator_id,
            finish_reason="stop",
            t_start=1.0,
            t_end=2.0,
            response_text=f"answer {k}",
        )
        for k in range(group_size)
    ]


def fake_batch(group_ids: list[str], **kwargs) -> pa.RecordBatch:
    """One record batch holding whole groups, rows of a group contiguous."""
    return rollouts_to_arrow([r for gid in group_ids for r in fake_group(gid, **kwargs)])


def fake_group_fast(
    group_id: str, group_size: int, response_len: int, prompt_len: int = 64, version: int = 0
) -> pa.RecordBatch:
    """A large group built column-wise (no per-token Python objects): for benchmarks."""
    n_tok = prompt_len + response_len
    tokens = pa.ListArray.from_arrays(
        pa.array(np.arange(0, group_size * n_tok + 1, n_tok, dtype=np.int32)),
        pa.array(np.tile(np.arange(n_tok, dtype=np.int32), group_size)),
    )

    def per_token(values: np.ndarray) -> pa.ListArray:
        offsets = np.arange(0, group_size * response_len + 1, response_len, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    ids = [f"{group_id}/{k}" for k in range(group_size)]
    columns = {
        "rollout_id": pa.array(ids),
        "prompt_id": pa.array([f"prompt-{group_id}"] * group_size),
        "group_id": pa.array([group_id] * group_size),
        "group_size": pa.array([group_size] * group_size, pa.int32()),
        "token_ids": tokens,
        "prompt_len": pa.array([prompt_len] * group_size, pa.int32()),
        "behaviour_logprobs": per_token(np.full(group_size * response_len, -0.5, np.float32)),
        "token_versions": per_token(np.full(group_size * response_len, version, np.int64)),
        "reward": pa.array(np.arange(group_size, dtype=np.float32) % 2),
        "policy_version": pa.array([version] * group_size, pa.int64()),
        "generator_id": pa.array(["bench"] * group_size),
        "finish_reason": pa.array(["length"] * group_size),
        "t_start": pa.array([1.0] * group_size),
        "t_end": pa.array([2.0] * group_size),
        "response_text": pa.array([""] * group_size),
        "reward_info": pa.array([""] * group_size),
        "data_source": pa.array([""] * group_size),
    }
    return pa.RecordBatch.from_pydict(columns, schema=ROLLOUT_SCHEMA)
