"""`data.offline`: offline sources mixed into learner batches, and the config rules they bring.

A source is a file (.jsonl, .json, .parquet, a `python -m launch.export` file) or a `datasets` source whose rows
hold a prompt (text or chat), a response (text or token ids) and a reward, and optionally the behaviour policy's
token log-probs and its version. `behaviour` says what the rows' behaviour log-probs are:
    recorded   present in every row (a row without them is skipped, counted as missing_behaviour_logprobs)
    reference  the reference model (the initial policy) produced the responses: the learner computes them
    none       unknown: only objectives that never read behaviour log-probs may train on the source
The loader is launch/offline_data.py; the mixing is the replay buffer's (buffer/replay.py, offline pool).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from learner.objectives.config import reads_behaviour


class OfflineSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    """A .jsonl/.json/.parquet file (an exported run's Parquet loads as is), or a `datasets` source."""
    source: str | None = None
    """Tag of the rows (their data_source, metrics and exports); default: each row's own tag, else the file stem."""
    behaviour: Literal["recorded", "reference", "none"] = "recorded"
    """What the rows' behaviour log-probs are: recorded (must be present), reference (the learner computes them
    with the reference model), none (unknown; refused by objectives that read them)."""
    split: str = "train"
    """`datasets` sources: the split to read."""
    load_kwargs: dict[str, Any] = {}
    """`datasets` sources: extra arguments of datasets.load_dataset."""
    prompt_key: str = "prompt"
    """Field holding the text prompt (a list of {role, content} there is read as a chat)."""
    messages_key: str = "messages"
    """Field holding a chat prompt; a chat ending with an assistant turn is that turn's prompt and response."""
    response_key: str = "response"
    """Field holding the response: text (tokenised with the model's tokenizer, no special tokens added) or a list
    of token ids."""
    reward_key: str = "reward"
    """Field holding the row's reward (a number)."""
    behaviour_key: str = "behaviour_logprobs"
    """Field holding the response tokens' behaviour log-probs (one per response token)."""
    version_key: str = "policy_version"
    """Field holding the behaviour policy's version (default -1: offline)."""
    group_key: str = "group_id"
    """Field naming the row's group; rows without it are grouped by their rendered prompt."""
    id_key: str = "id"
    """Field holding the prompt's id."""
    source_key: str = "data_source"
    """Field holding the row's own source tag (used when `source` is not set)."""


def check_offline(data, learner, pushes_weights: bool) -> str | None:
    """The first rule `data.offline` breaks, as one line naming the key (None: none). `data` is the run's
    DataConfig, `learner` its LearnerConfig; `pushes_weights`: weights.transport pushes to the generators."""
    sources, fraction, objective = data.offline, data.offline_fraction, learner.objective
    groups_per_step = learner.groups_per_step
    if fraction > 0 and not sources:
        return f"config key 'data.offline_fraction': {fraction} of each batch from offline data, but data.offline is empty"
    if sources and fraction == 0:
        return "config key 'data.offline': sources given but data.offline_fraction is 0, so no batch would use them"
    if fraction == 1.0 and (data.eval_every or pushes_weights):
        return ("config key 'data.offline_fraction': 1.0 starts no rollout actor, so "
                + ("data.eval_every must be 0" if data.eval_every else "weights.transport cannot push"))
    if any(s.behaviour == "reference" for s in sources) and learner.behaviour_fill != "reference":
        return ("config key 'learner.behaviour_fill': a data.offline source has behaviour reference, whose log-probs "
                "the learner computes with the reference model: set it to reference")
    for i, s in enumerate(sources):
        local = s.path.startswith((".", "/", "~")) or s.path.count("/") != 1  # else a hub name owner/dataset
        if local and not Path(s.path).expanduser().exists():
            return f"config key 'data.offline[{i}].path': offline source {s.path} does not exist"
    share = fraction * groups_per_step
    if abs(share - round(share)) > 1e-9:
        return (f"config key 'data.offline_fraction': {fraction} x learner.groups_per_step {groups_per_step} = "
                f"{share:g} groups; the offline share of a batch must be a whole number of groups")
    if reads_behaviour(objective):
        for i, s in enumerate(sources):
            if s.behaviour == "none":
                return (f"config key 'data.offline[{i}].behaviour': source {s.source or s.path} has no behaviour "
                        f"log-probs (none), and objective {objective.name!r} reads them (importance ratios or "
                        "clips against the behaviour policy): use behaviour reference or recorded, or an objective "
                        "that does not read them (reinforce, asymre, kl_pg, agro, agro_on_policy, dpo, ipo)")
    return None
