"""A mixture of training sources (`data.sources`, launch/sources_config.py): each source loaded and rendered on its
own, its rows tagged with its name, and one stream that draws every prompt of a request from a source chosen in
proportion to the weights.

The draw is deterministic under `data.seed` and resumes exactly: the stream's position (the number of draws made,
and each source's own shuffled-epoch position) is part of the launcher's checkpointed state (launch/state.py), and
the generator of the draws is rebuilt from the seed and advanced by that many draws. A source that runs out starts
its next shuffled epoch, as data.train does.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import Counter
from dataclasses import dataclass, replace

from actors.prompts import Prompt
from launch.data import DataError, PromptSet, PromptStream, load_prompts, prompt_format, render_prompts
from launch.sources_config import SourceConfig, effective_data


@dataclass
class SourceData:
    name: str
    weight: float
    train: PromptSet  # rendered, tagged with the source's name
    eval: list[Prompt]  # held-out prompts, rendered and tagged; [] without `eval`


def load_source(cfg, index: int, source: SourceConfig, tokenizer) -> SourceData:
    """One source's prompts, loaded with its effective data.* settings, rendered with the run's tokenizer and
    tagged with its name. Raises DataError naming the source when no row is usable."""
    data = effective_data(cfg.data, source)
    max_len = cfg.model.max_model_len - cfg.actors.max_tokens
    if data.max_prompt_len is not None:
        max_len = min(max_len, data.max_prompt_len)
    fmt = prompt_format(data)
    try:
        train = render_prompts(load_prompts(source.train, data), tokenizer, fmt, max_len, source.train)
        evals = render_prompts(load_prompts(source.eval, data, data.eval_split), tokenizer, fmt, max_len,
                               source.eval) if source.eval else PromptSet([])
    except DataError as exc:
        raise DataError(f"config key 'data.sources[{index}]' ({source.name}): {exc}") from None

    def tagged(prompts: list[Prompt]) -> list[Prompt]:  # the name routes the reward, whatever the rows said
        return [replace(p, data_source=source.name) for p in prompts]

    return SourceData(source.name, source.weight, PromptSet(tagged(train.prompts), train.skipped),
                      tagged(evals.prompts))


def combined(sources: list[SourceData]) -> PromptSet:
    """Every source's training prompts as one set, skipped rows summed by reason (the run's skipped/<reason>)."""
    skipped: Counter[str] = Counter()
    for s in sources:
        skipped.update(s.train.skipped)
    return PromptSet([p for s in sources for p in s.train.prompts], dict(skipped))


def _source_seed(seed: int, name: str) -> int:
    """Each source's own shuffle seed: different sources never share an epoch order by accident."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")


class MixtureStream:
    """Prompts drawn one at a time: a source with probability weight / sum of weights (one `random()` of a
    generator seeded with `seed` per draw), then that source's next prompt from its own endless shuffled epochs.
    Same interface as PromptStream: take, state, restore."""

    def __init__(self, sources: list[tuple[str, float, list[Prompt]]], seed: int):
        self.seed, self.draws = seed, 0
        self.names = [name for name, _, _ in sources]
        total = sum(w for _, w, _ in sources)
        self._edges = list(itertools.accumulate(w / total for _, w, _ in sources))  # cumulative probabilities
        self.streams = {name: PromptStream(prompts, _source_seed(seed, name)) for name, _, prompts in sources}
        self._rng = random.Random(seed)

    def _pick(self) -> str:
        self.draws += 1
        return self.names[min(bisect.bisect_right(self._edges, self._rng.random()), len(self.names) - 1)]

    def take(self, n: int) -> list[Prompt]:
        return [self.streams[self._pick()].take(1)[0] for _ in range(n)]

    def state(self) -> dict:
        return {"draws": self.draws, "sources": {name: s.state() for name, s in self.streams.items()}}

    def restore(self, state: dict) -> None:
        saved = state.get("sources")
        if saved is None or set(saved) != set(self.streams):
            raise DataError(f"the checkpoint's data position is for sources {sorted(saved or ['data.train'])}, "
                             f"but data.sources names {sorted(self.streams)}: resume with the run's own sources")
        self._rng, self.draws = random.Random(self.seed), state["draws"]
        for _ in range(self.draws):  # the generator where the checkpoint left it: the same draws follow
            self._rng.random()
        for name, stream in self.streams.items():
            stream.restore(saved[name])


def make_stream(train: PromptSet, sources: list[SourceData], seed: int) -> PromptStream | MixtureStream:
    """data.train's stream, or data.sources' mixture."""
    if not sources:
        return PromptStream(train.prompts, seed)
    return MixtureStream([(s.name, s.weight, s.train.prompts) for s in sources], seed)


def source_summary(sources: list[SourceData], history: list[dict], dispatched: Counter, skipped: Counter) -> dict:
    """summary.json's per-source part: weight, prompts, groups dispatched and skipped, and the mean of
    reward_mean/<source> over the first and the last fifth of the steps whose batch held that source."""
    out = {}
    for s in sources:
        rewards = [h[f"reward_mean/{s.name}"] for h in history if h.get(f"reward_mean/{s.name}") is not None]
        k = max(len(rewards) // 5, 1)
        out[s.name] = {"weight": s.weight, "prompts": len(s.train.prompts), "eval_prompts": len(s.eval),
                       "groups_dispatched": dispatched.get(s.name, 0), "groups_skipped": skipped.get(s.name, 0),
                       "skipped_at_load": s.train.skipped, "steps_with_source": len(rewards),
                       "reward_first": round(sum(rewards[:k]) / k, 4) if rewards else None,
                       "reward_last": round(sum(rewards[-k:]) / k, 4) if rewards else None}
    return out
