"""`data.sources`: a mixture of training sources, each with its sampling weight and its own reward.

A source reads prompts as `data.train` does (synthetic:arithmetic, a .jsonl/.json/.parquet file, a `datasets`
source). Its `name` tags every row it yields: the rows' data_source, hence the reward that scores them, the
per-source metrics (`reward_mean/<name>`) and the exports. A row's own `data.source_key` field is not read under
`data.sources`: the name wins, so the routing from a row to its reward is the config's and nothing else. Fields a
source leaves unset (split, field keys, chat template, ...) are `data.*`'s. Every source's `reward` becomes the
route `<name>: <reward>` of the run's reward mapping (`actors.reward`), which the rollout actors score by.
The loader and the weighted stream are launch/mixture.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PACKAGED_BUILDERS = ("json", "csv", "parquet", "arrow", "text")  # datasets.load_dataset names read data.load_kwargs
DEFAULT_ROUTE = "default"  # actors/rewards.py's key for sources without their own reward
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a metric suffix (reward_mean/<name>) and a file-name-safe tag
# the data.* fields a source may set for itself (unset: data.*'s)
OVERRIDES = ("split", "eval_split", "load_kwargs", "prompt_key", "messages_key", "answer_key", "id_key",
             "require_answer", "apply_chat_template", "system_prompt", "max_prompt_len", "max_operand")


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    """The source's tag: its rows' data_source, its reward route and its metrics' suffix (letters, digits, _ . -)."""
    train: str
    """Its prompts, in any form data.train takes (synthetic:arithmetic, a .jsonl/.json/.parquet file, a `datasets`
    source)."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight: each prompt of a request comes from this source with probability weight / sum of weights."""
    reward: str | None = None
    """Reward of its rows (a builtin, path/to/file.py:function, or model:<name> for rewards.models.<name>); unset:
    actors.reward routes them (its `default`, or an entry under this source's name)."""
    eval: str | None = None
    """Held-out prompts of this source for greedy evaluation (data.eval_every), scored by its reward; logged as
    eval/reward_mean/<name>."""
    split: str | None = None
    """`datasets` sources: the split `train` reads (unset: data.split)."""
    eval_split: str | None = None
    """`datasets` sources: the split `eval` reads (unset: data.eval_split)."""
    load_kwargs: dict[str, Any] | None = None
    """`datasets` sources: extra arguments of datasets.load_dataset (unset: data.load_kwargs)."""
    prompt_key: str | None = None
    """Field holding the text prompt (unset: data.prompt_key)."""
    messages_key: str | None = None
    """Field holding a chat prompt (unset: data.messages_key)."""
    answer_key: str | None = None
    """Field holding the reference answer (unset: data.answer_key)."""
    id_key: str | None = None
    """Field holding the row's id (unset: data.id_key)."""
    require_answer: bool | None = None
    """Skip rows without an answer (unset: data.require_answer)."""
    apply_chat_template: bool | Literal["auto"] | None = None
    """Text prompts through the chat template (unset: data.apply_chat_template)."""
    system_prompt: str | None = None
    """A system turn before every prompt (unset: data.system_prompt)."""
    max_prompt_len: int | None = Field(None, ge=1)
    """Skip rows whose rendered prompt is longer, in tokens (unset: data.max_prompt_len)."""
    max_operand: int | None = Field(None, ge=1)
    """synthetic:arithmetic: operands range over 0..max_operand (unset: data.max_operand)."""


def effective_data(data, source: SourceConfig):
    """The DataConfig that loads `source`: data.* with the source's own prompts and the fields it sets."""
    update = {k: getattr(source, k) for k in OVERRIDES if getattr(source, k) is not None}
    return data.model_copy(update={**update, "train": source.train, "eval": source.eval, "sources": []})


def with_source_rewards(reward: str | dict[str, str], reward_set: bool, sources: list[SourceConfig]):
    """actors.reward with a route per source that names its reward. The mapping keeps `default` (a plain
    actors.reward) unless actors.reward was left unset and every source names its own. Raises ValueError naming
    both keys when a source's route conflicts with an explicit entry of actors.reward (or another source)."""
    if not sources:
        return reward
    own = all(s.reward is not None for s in sources)
    routes = ({} if own and not reward_set else {DEFAULT_ROUTE: reward}) if isinstance(reward, str) else dict(reward)
    named: dict[str, int] = {}
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if not SOURCE_NAME.fullmatch(s.name) or s.name == DEFAULT_ROUTE:
            raise ValueError(f"config key '{key}.name': {s.name!r} is not a source name (letters, digits, _ . -; "
                             f"not {DEFAULT_ROUTE!r}, which is actors.reward's route for unnamed sources)")
        if s.name in named:
            raise ValueError(f"config key '{key}.name': {s.name!r} is also data.sources[{named[s.name]}]'s name")
        named[s.name] = i
        if s.reward is None:
            continue
        if routes.get(s.name, s.reward) != s.reward:  # the same spec twice (a resumed run's config.yaml) is fine
            raise ValueError(f"config key '{key}.reward': {s.reward!r} conflicts with "
                             f"'actors.reward.{s.name}': {routes[s.name]!r}; set the reward in one place")
        routes[s.name] = s.reward
    for i, s in enumerate(sources):
        if s.name not in routes and DEFAULT_ROUTE not in routes:
            raise ValueError(f"config key 'data.sources[{i}].reward': source {s.name!r} has no reward; set it, or "
                             f"give actors.reward an entry {s.name!r} or {DEFAULT_ROUTE!r}")
    return routes


def looks_local(path: str) -> bool:
    """A path on this machine rather than a hub name owner/dataset."""
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


def missing_file(source: str) -> bool:
    """A local-looking prompt source (not synthetic:, a packaged builder or a hub name) that does not exist."""
    return (not source.startswith("synthetic:") and source not in PACKAGED_BUILDERS and looks_local(source)
            and not Path(source).expanduser().exists())


def check_data(data) -> str | None:
    """The first rule the prompt sources break, as one line naming the key (None: none): a local prompt file
    that does not exist, and data.sources' rules. `data` is a DataConfig."""
    for key, source in (("data.train", data.train), ("data.eval", data.eval)):
        if source and missing_file(source):
            return f"config key {key!r}: dataset file {source} does not exist"
    if not data.sources:
        return None
    # a resumed run's config.yaml spells out data.train's default beside data.sources: only another value is refused
    if data.train != type(data).model_fields["train"].default:
        return ("config key 'data.train': data.train and data.sources are mutually exclusive; list the "
                "training prompts as a source (data.sources[i].train)")
    if data.eval is not None:
        return ("config key 'data.eval': with data.sources each source names its own held-out prompts "
                "(data.sources[i].eval), scored by its reward")
    for i, s in enumerate(data.sources):
        for field in ("train", "eval"):
            if (path := getattr(s, field)) and missing_file(path):
                return f"config key 'data.sources[{i}].{field}': dataset file {path} does not exist"
    return None
