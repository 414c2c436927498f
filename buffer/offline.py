"""Offline data: rollouts from Parquet or JSONL files, as groups an off-policy objective can train on.

Each row needs prompt_id, token_ids, prompt_len and reward; every other Rollout field is optional:
    group_id        default "offline:<file>:<prompt_id>": all rows of one prompt in a file form one group
    group_size      default the number of rows in that group
    rollout_id      default "offline:<file>:<row>"
    behaviour_logprobs  default NaN for every response token (also for a null or empty list when the
                    response is not empty). NaN means "unknown behaviour policy": the learner must
                    replace them by log-probs it recomputes (the current policy, making the ratio 1),
                    see missing_behaviour_logprobs() in buffer/schema.py.
    policy_version  default OFFLINE_POLICY_VERSION (-1); token_versions follow it
    generator_id    default "offline:<file>"; finish_reason "stop"; times 0.0; texts ""
Offline groups hold no admission slot and are exempt from the staleness bound (ReplayBuffer.load_offline).
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from buffer.schema import Rollout, rollouts_to_arrow

OFFLINE_POLICY_VERSION = -1
REQUIRED = ("prompt_id", "token_ids", "prompt_len", "reward")


def read_offline(path: str) -> pa.Table:
    """Rollouts from one .parquet/.jsonl file, or every such file in a directory, with ROLLOUT_SCHEMA."""
    files = _files(path)
    tables = [rollouts_to_arrow([_rollout(row, file, i) for i, row in _grouped(_rows(file), file)]) for file in files]
    return pa.Table.from_batches(tables)


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.parquet")) + glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"no .parquet or .jsonl files in offline data directory {path}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"offline data file {path} does not exist")
    return [path]


def _rows(file: str) -> list[dict]:
    if file.endswith(".parquet"):
        try:
            return pq.read_table(file).to_pylist()
        except pa.ArrowInvalid as e:
            raise ValueError(f"offline data file {file} is not readable Parquet: {e}") from e
    if file.endswith((".jsonl", ".json")):
        rows = []
        with open(file) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"offline data file {file} line {lineno}: not JSON ({e})") from e
        return rows
    raise ValueError(f"offline data file {file}: expected .parquet or .jsonl")


def _grouped(rows: list[dict], file: str) -> list[tuple[int, dict]]:
    """Rows with group_id and group_size filled, members of a group made contiguous."""
    base = os.path.basename(file)
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if row.get(k) is None]
        if missing:
            raise ValueError(f"offline data file {file} row {i}: missing {missing}")
        if row.get("group_id") is None:
            row["group_id"] = f"offline:{base}:{row['prompt_id']}"
    sizes = Counter(row["group_id"] for row in rows)
    for row in rows:
        if row.get("group_size") is None:
            row["group_size"] = sizes[row["group_id"]]
    order = {gid: k for k, gid in enumerate(dict.fromkeys(row["group_id"] for row in rows))}
    return sorted(enumerate(rows), key=lambda item: order[item[1]["group_id"]])


def _rollout(row: dict, file: str, i: int) -> Rollout:
    base = os.path.basename(file)
    n_resp = len(row["token_ids"]) - int(row["prompt_len"])
    logprobs = row.get("behaviour_logprobs") or [math.nan] * n_resp
    version = row.get("policy_version")
    version = OFFLINE_POLICY_VERSION if version is None else int(version)
    try:
        return Rollout(
            rollout_id=str(row.get("rollout_id") or f"offline:{base}:{i}"),
            prompt_id=str(row["prompt_id"]),
            group_id=str(row["group_id"]),
            group_size=int(row["group_size"]),
            token_ids=[int(t) for t in row["token_ids"]],
            prompt_len=int(row["prompt_len"]),
            behaviour_logprobs=[math.nan if x is None else float(x) for x in logprobs],
            reward=float(row["reward"]),
            policy_version=version,
            generator_id=str(row.get("generator_id") or f"offline:{base}"),
            finish_reason=str(row.get("finish_reason") or "stop"),
            t_start=float(row.get("t_start") or 0.0),
            t_end=float(row.get("t_end") or 0.0),
            response_text=str(row.get("response_text") or ""),
            reward_info=str(row.get("reward_info") or ""),
            token_versions=[int(v) for v in row.get("token_versions") or []],
            data_source=str(row.get("data_source") or ""),
        )
    except ValueError as e:
        raise ValueError(f"offline data file {file} row {i}: {e}") from e
