"""Prompt sources: the built-in synthetic arithmetic task, prompt files, and any `datasets` source.

A row is a mapping with a text prompt (`data.prompt_key`) or a chat (`data.messages_key`, a list of
{role, content}), a reference answer (`data.answer_key`) when the reward needs one, and optionally an id and a
source tag; every other field is kept as metadata for the reward. .jsonl files are read line by line (a line
that is not JSON is one skipped row, not a failed file), .json and .parquet directly, anything else through
`datasets.load_dataset`. Malformed rows are counted by reason and skipped; a source with no usable row is an
error naming the source and the reasons. `launch.run_data.prepare_prompts` then renders every row once with the run's tokenizer
(actors/prompts.py) and skips, counted, rows too long for `data.max_prompt_len` or the model's context.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from actors.prompts import Prompt, PromptFormat, has_chat_template, render_all
from launch.config import DataConfig
from launch.sources_config import PACKAGED_BUILDERS

SYNTHETIC_PREFIX = "synthetic:"


class DataError(ValueError):
    """A prompt source that cannot be used; raised before any actor starts."""


def arithmetic_examples(max_operand: int, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def arithmetic_corpus(max_operand: int) -> list[str]:
    """Every problem with its answer: the text the tokenizer is trained on."""
    return [f"{a}+{b}={a + b}" for a in range(max_operand + 1) for b in range(max_operand + 1)]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows


def load_prompts(source: str, data: DataConfig | None = None, split: str | None = None) -> PromptSet:
    """The rows of `source` as prompts (not yet rendered): synthetic:arithmetic (every a+b with a, b <=
    data.max_operand), a file, or a `datasets` source. Raises DataError when no row is usable."""
    data = data or DataConfig()
    if source == SYNTHETIC_PREFIX + "arithmetic":
        n = data.max_operand + 1
        return PromptSet([Prompt(id=f"add-{a}+{b}", text=f"{a}+{b}=", answer=str(a + b), data_source="arithmetic")
                          for a in range(n) for b in range(n)])
    if source.startswith(SYNTHETIC_PREFIX):
        raise DataError(f"data source {source!r}: the only synthetic task is synthetic:arithmetic")
    skipped: Counter[str] = Counter()
    rows = _read_rows(source, data, split or data.split, skipped)
    name = Path(source).stem if Path(source).exists() else source.replace("/", "_")
    prompts = []
    for index, row in enumerate(rows):
        prompt = parse_row(row, data, f"{name}-{index}")
        if isinstance(prompt, str):
            skipped[prompt] += 1
        else:
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"prompt source {source}: no usable rows (skipped by reason: {dict(skipped) or 'no rows'}; "
                        f"fields read: prompt {data.prompt_key!r} or messages {data.messages_key!r}, "
                        f"answer {data.answer_key!r})")
    return PromptSet(prompts, dict(skipped))


def _read_rows(source: str, data: DataConfig, split: str, skipped: Counter) -> Iterable[Any]:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl_rows(path, skipped)
    if path.is_file() and path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError:  # JSON lines under a .json name
            return _jsonl_rows(path, skipped)
        if not isinstance(rows, list):
            raise DataError(f"prompt file {source}: a .json file holds a list of rows (or one JSON object a line)")
        return rows
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return _datasets_rows(source, path, data, split)


def _jsonl_rows(path: Path, skipped: Counter) -> Iterable[Any]:
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1


def _datasets_rows(source: str, path: Path, data: DataConfig, split: str) -> Iterable[Any]:
    """A local directory or data file, a packaged builder (json, parquet, ... with data.load_kwargs), or a hub
    name (needs the network, or the datasets cache)."""
    import datasets

    if not path.exists() and source not in PACKAGED_BUILDERS and source.count("/") != 1:
        raise DataError(f"prompt source {source}: no such file or directory (and not a hub name owner/dataset)")
    kwargs, builder = dict(data.load_kwargs), source
    if path.is_file():  # a data file of another format (csv, arrow, ...): its extension names the builder
        kwargs.setdefault("data_files", str(path))
        builder = {".csv": "csv", ".arrow": "arrow", ".txt": "text"}.get(path.suffix, "json")
    try:
        ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as exc:  # offline, a missing split, a bad argument: name the source and say what went wrong
        raise DataError(f"prompt source {source}: datasets.load_dataset failed ({type(exc).__name__}: {exc})") from None
    return iter(ds)


def _get(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _messages(value: Any) -> list[dict[str, str]] | None:
    """A chat as a list of {role, content} strings, or None when `value` is not one."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out if out[-1]["role"] != "assistant" else None  # the model answers the last turn, not after its own


def parse_row(row: Any, data: DataConfig, default_id: str) -> Prompt | str:
    """A row as a Prompt, or the reason it is skipped."""
    if not isinstance(row, dict):
        return "not_an_object"
    raw_messages = _get(row, data.messages_key)
    raw_prompt = _get(row, data.prompt_key)
    if raw_messages is None and isinstance(raw_prompt, list):  # verl's parquet files keep the chat under `prompt`
        raw_messages, raw_prompt = raw_prompt, None
    if raw_messages is not None:
        messages = _messages(raw_messages)
        if messages is None:
            return "bad_messages"
        users = [m["content"] for m in messages if m["role"] == "user"]
        text = users[-1] if users else messages[-1]["content"]
    elif raw_prompt is None:
        return "missing_prompt"
    elif not isinstance(raw_prompt, str) or not raw_prompt.strip():
        return "bad_prompt"
    else:
        messages, text = None, raw_prompt
    answer = _get(row, data.answer_key)
    if answer is None and data.require_answer:
        return "missing_answer"
    row_id, source = _get(row, data.id_key), _get(row, data.source_key)
    used = {data.messages_key, data.prompt_key, data.answer_key, data.id_key, data.source_key}
    metadata = {k: v for k, v in row.items() if k not in used}
    # JSON-safe (checkpoints write admitted prompts into state.json); a value JSON cannot hold becomes its str
    metadata = json.loads(json.dumps(metadata, default=str))
    return Prompt(id=str(row_id) if row_id is not None else default_id, text=text,
                  answer="" if answer is None else str(answer), messages=messages,
                  data_source="" if source is None else str(source), metadata=metadata)


def prompt_format(data: DataConfig) -> PromptFormat:
    """The run's rendering. `auto` leaves synthetic:arithmetic untemplated: it is a completion task (`3+4=`
    continued by the answer), and through the template the tiny default model learns it worse (greedy accuracy
    after its warm start 0.15 templated vs 0.32 plain); `apply_chat_template: true` templates it anyway."""
    template = data.apply_chat_template
    if template == "auto" and data.train.startswith(SYNTHETIC_PREFIX):
        template = False
    return PromptFormat(apply_chat_template=template, system_prompt=data.system_prompt)


def render_prompts(prompt_set: PromptSet, tokenizer, fmt: PromptFormat, max_len: int, source: str) -> PromptSet:
    """Every prompt with its token ids (the one rendering, actors/prompts.py); rows longer than `max_len` tokens,
    or empty once rendered, are skipped and counted. Raises DataError when none is left."""
    chats = sum(p.messages is not None for p in prompt_set.prompts)
    if chats and not has_chat_template(tokenizer):
        raise DataError(f"prompt source {source}: {chats} rows are chats (messages), and the model's tokenizer "
                        "has no chat template: use a chat model, or text prompts with data.apply_chat_template false")
    try:
        rendered = render_all(tokenizer, prompt_set.prompts, fmt)
    except ValueError as exc:  # the format cannot apply (a system prompt or a template the tokenizer lacks)
        raise DataError(f"prompt source {source}: {exc}") from None
    skipped, kept = Counter(prompt_set.skipped), []
    for p, ids in zip(prompt_set.prompts, rendered):
        if not ids or len(ids) > max_len:
            skipped["prompt_too_long" if ids else "prompt_empty"] += 1
        else:
            kept.append(replace(p, token_ids=ids))
    if not kept:
        raise DataError(f"prompt source {source}: no row fits (longest allowed prompt: {max_len} tokens; "
                        f"skipped by reason: {dict(skipped)})")
    return PromptSet(kept, dict(skipped))


class PromptStream:
    """Endless shuffled epochs over a prompt set, with a position that a checkpoint can restore."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts, self.seed = prompts, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()
