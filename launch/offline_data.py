"""Loading `data.offline` sources (launch/offline_config.py) into Rollout records, before any actor starts.

Prompts go through the same parse (launch/data.py) and rendering (actors/prompts.py) as online prompts; a text
response is tokenised with the run's tokenizer without special tokens, so the learner trains on exactly those
ids. A file written by `python -m launch.export` (Parquet with `relay.schema_version`) is read through
buffer/offline.py, ids and log-probs unchanged. Bad rows are counted by reason and skipped; a source with no
usable row is a DataError naming it and the reasons.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.prompts import render_all
from buffer.offline import OFFLINE_POLICY_VERSION, read_offline
from buffer.schema import SCHEMA_VERSION, Rollout, rollouts_to_arrow
from launch.config import DataConfig, RunConfig
from launch.data import DataError, _read_rows, parse_row, prompt_format
from launch.offline_config import OfflineSourceConfig

_NO_ANSWER = "\0relay-no-answer"  # offline rows carry their reward: no reference answer is read


@dataclass
class OfflineSet:
    """One source's usable rows as whole groups (ROLLOUT_SCHEMA), and what was skipped."""

    name: str
    table: pa.Table
    groups: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class _Row:  # one candidate row, before its checks
    prompt_ids: list[int]
    response: Any  # text or token ids
    reward: Any
    behaviour: Any
    version: Any
    group: str | None
    tag: str
    prompt_id: str
    token_versions: list[int] | None = None
    rollout_id: str | None = None


def exported_version(path: str) -> int | None:
    """`relay.schema_version` of a Parquet file written by launch.export (None: not one)."""
    if not path.endswith(".parquet") or not Path(path).is_file():
        return None
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    value = meta.get(b"relay.schema_version")
    return None if value is None else int(value)


def _exported_rows(path: str, tag: str | None) -> list[_Row]:
    version = exported_version(path)
    if version > SCHEMA_VERSION:
        raise DataError(f"offline source {path}: written with rollout schema version {version}, newer than this "
                        f"Relay's {SCHEMA_VERSION}: load it with a newer Relay (or re-export it)")
    out = []
    for r in read_offline(path).to_pylist():
        p = r["prompt_len"]
        behaviour = r["behaviour_logprobs"]
        out.append(_Row(r["token_ids"][:p], r["token_ids"][p:], r["reward"],
                        None if any(math.isnan(x) for x in behaviour) else behaviour, r["policy_version"],
                        r["group_id"], tag or r["data_source"] or Path(path).stem, r["prompt_id"],
                        r["token_versions"], r["rollout_id"]))
    return out


def _split_chat(row: dict, s: OfflineSourceConfig) -> dict:
    """A chat whose last turn is the assistant's, and no response field: that turn is the response."""
    chat = row.get(s.messages_key)
    if row.get(s.response_key) is None and isinstance(chat, list) and chat and isinstance(chat[-1], dict) \
            and chat[-1].get("role") == "assistant":
        row = {**row, s.messages_key: chat[:-1], s.response_key: chat[-1].get("content")}
    return row


def _dataset_rows(s: OfflineSourceConfig, data: DataConfig, tokenizer, skipped: Counter) -> list[_Row]:
    keys = DataConfig(prompt_key=s.prompt_key, messages_key=s.messages_key, answer_key=_NO_ANSWER, id_key=s.id_key,
                      source_key=s.source_key, require_answer=False, split=s.split, load_kwargs=s.load_kwargs)
    stem = Path(s.path).stem if Path(s.path).exists() else s.path.replace("/", "_")
    parsed = []
    for i, raw in enumerate(_read_rows(s.path, keys, s.split, skipped)):
        if not isinstance(raw, dict):
            skipped["not_an_object"] += 1
            continue
        row = _split_chat(raw, s)
        prompt = parse_row(row, keys, f"{stem}-{i}")
        if isinstance(prompt, str):
            skipped[prompt] += 1
        else:
            parsed.append((row, prompt))
    rendered = render_all(tokenizer, [p for _, p in parsed], prompt_format(data)) if parsed else []
    return [_Row(ids, row.get(s.response_key), row.get(s.reward_key), row.get(s.behaviour_key),
                 row.get(s.version_key), None if row.get(s.group_key) is None else str(row[s.group_key]),
                 s.source or prompt.data_source or stem, prompt.id)
            for (row, prompt), ids in zip(parsed, rendered)]


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _check(row: _Row, s: OfflineSourceConfig, tokenizer, max_response: int, context: int) -> tuple | str:
    """(response ids, reward, behaviour log-probs, version) of a usable row, or the reason it is skipped."""
    resp = row.response
    if resp is None:
        return "missing_response"
    if isinstance(resp, str):
        resp = tokenizer(resp, add_special_tokens=False)["input_ids"]
    elif not isinstance(resp, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer)
                                               for t in resp):
        return "bad_response"
    if not resp:
        return "empty_response"
    if not row.prompt_ids:
        return "prompt_empty"
    if len(resp) > max_response:
        return "response_too_long"
    if len(row.prompt_ids) + len(resp) > context:
        return "longer_than_context"
    if row.reward is None:
        return "missing_reward"
    if (reward := _number(row.reward)) is None:
        return "bad_reward"
    behaviour = [math.nan] * len(resp)
    if s.behaviour == "recorded":
        if row.behaviour is None:
            return "missing_behaviour_logprobs"
        if not isinstance(row.behaviour, list) or len(row.behaviour) != len(resp):
            return "bad_behaviour_logprobs"
        behaviour = [_number(x) for x in row.behaviour]
        if any(x is None for x in behaviour):
            return "bad_behaviour_logprobs"
    version = OFFLINE_POLICY_VERSION if row.version is None else row.version
    if isinstance(version, bool) or not isinstance(version, int):
        return "bad_policy_version"
    return resp, reward, behaviour, version


def load_offline_source(s: OfflineSourceConfig, cfg: RunConfig, tokenizer) -> OfflineSet:
    """One source's rows as whole groups; raises DataError when no row is usable."""
    skipped: Counter[str] = Counter()
    version = exported_version(s.path)
    rows = _exported_rows(s.path, s.source) if version is not None else _dataset_rows(s, cfg.data, tokenizer, skipped)
    max_response = cfg.learner.objective.max_len or cfg.actors.max_tokens  # token_sum's constant bounds T
    kept: list[tuple[_Row, tuple]] = []
    for row in rows:
        checked = _check(row, s, tokenizer, max_response, cfg.model.max_model_len)
        if isinstance(checked, str):
            skipped[checked] += 1
        else:
            kept.append((row, checked))
    name = s.source or s.path
    if not kept:
        raise DataError(f"offline source {name}: no usable rows (skipped by reason: {dict(skipped) or 'no rows'}; "
                        f"fields read: prompt {s.prompt_key!r} or messages {s.messages_key!r}, response "
                        f"{s.response_key!r}, reward {s.reward_key!r}, behaviour {s.behaviour!r})")
    table = _as_groups(kept, name)
    return OfflineSet(name, table, len(set(table.column("group_id").to_pylist())), dict(skipped))


def _as_groups(kept: list[tuple[_Row, tuple]], name: str) -> pa.Table:
    """Rollouts, members of a group contiguous; a group's size is its usable rows (skipped ones never come)."""
    groups: dict[str, list] = {}
    for row, checked in kept:
        key = row.group if row.group is not None else "prompt:" + ",".join(map(str, row.prompt_ids))
        groups.setdefault(key, []).append((row, checked))
    rollouts = []
    for g, (key, members) in enumerate(groups.items()):
        for k, (row, (resp, reward, behaviour, version)) in enumerate(members):
            versions = row.token_versions if row.token_versions and len(row.token_versions) == len(resp) else None
            rollouts.append(Rollout(
                rollout_id=f"offline:{name}:{row.rollout_id or f'{g}.{k}'}", prompt_id=str(row.prompt_id),
                group_id=f"offline:{name}:{key if row.group is not None else g}", group_size=len(members),
                token_ids=list(row.prompt_ids) + list(resp), prompt_len=len(row.prompt_ids),
                behaviour_logprobs=behaviour, reward=reward, policy_version=int(version),
                generator_id=f"offline:{name}", finish_reason="stop", t_start=0.0, t_end=0.0,
                token_versions=versions or [], data_source=row.tag))
    return pa.Table.from_batches([rollouts_to_arrow(rollouts)])


def load_offline(cfg: RunConfig, tokenizer) -> list[OfflineSet]:
    """Every `data.offline` source, loaded and checked."""
    return [load_offline_source(s, cfg, tokenizer) for s in cfg.data.offline]
