"""The launcher's state: one typed record, written whole into every checkpoint and read whole on resume.

`step` is the run's one clock: the learner's optimizer steps, which is also the version of the weights
the learner holds. Everything else that needs a version is handed this number (the buffer's admission and
sample calls, the metrics line) or reads it from a published `WeightHandle`; nothing keeps a copy in sync.
Requests are here from admission until the buffer acknowledged their put, so a checkpoint taken at any
moment knows which generations may still be missing and resume re-issues exactly those.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from actors.generator import Prompt


@dataclass
class Request:
    """One generation request: the unit of admission, dispatch and re-issue."""

    id: str
    prompts: list[Prompt]
    actor: int = -1  # fleet slot of the current attempt
    generator_id: str = ""  # the actor of the current attempt (a slot's failed actor is replaced under a new id)
    attempts: int = 0
    offered_version: int = 0  # the newest weights the current attempt was sent with
    start_step: int = 0  # the learner step it may start at: admission can reserve one step ahead

    @classmethod
    def from_json(cls, d: dict) -> Request:
        return cls(d["id"], [Prompt(**p) for p in d["prompts"]], d.get("actor", -1), d.get("generator_id", ""),
                   d.get("attempts", 0), d.get("offered_version", 0), d.get("start_step", 0))


COUNTERS = ("skipped", "reward_faults", "trained", "dispatched_by_source", "skipped_by_source")


@dataclass
class RunState:
    step: int = 0  # learner optimizer steps == the learner's weight version: the run's one clock
    stream: dict = field(default_factory=dict)  # PromptStream.state(): the data position
    request_seq: int = 0  # requests ever admitted (ids are numbered from it)
    groups_dispatched: int = 0
    reissued: int = 0
    requests: dict[str, Request] = field(default_factory=dict)  # admitted, put not yet acknowledged
    skipped: Counter = field(default_factory=Counter)  # reason -> groups (prompt rows and generations)
    reward_faults: Counter = field(default_factory=Counter)  # reason -> samples scored 0
    trained: Counter = field(default_factory=Counter)  # group id -> times a learner step used it
    rollout_actors: int = 1  # the fleet size asked for (config, then launch.scale)
    dispatched_by_source: Counter = field(default_factory=Counter)  # data_source -> groups dispatched
    skipped_by_source: Counter = field(default_factory=Counter)  # data_source -> groups skipped (at load, generating)

    def new_request(self, prompts: list[Prompt], start_step: int = 0) -> Request:
        req = Request(f"req-{self.request_seq:09d}", prompts, start_step=start_step)
        self.request_seq += 1
        self.groups_dispatched += len(prompts)
        self.dispatched_by_source.update(p.data_source for p in prompts if p.data_source)
        self.requests[req.id] = req
        return req

    def count(self, result) -> None:
        """What a stored request's generation (actors.generator.GenerationResult) skipped and scored 0."""
        self.skipped.update(result.skipped)
        self.skipped_by_source.update({k: v for k, v in result.skipped_by_source.items() if k})  # untagged: no source
        self.reward_faults.update(result.reward_faults)

    def to_json(self) -> dict:
        # field by field: asdict would rebuild each Counter from (key, value) pairs, i.e. count the pairs
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out.update({name: dict(getattr(self, name)) for name in COUNTERS})
        out["requests"] = [asdict(r) for r in self.requests.values()]
        return out

    @classmethod
    def from_json(cls, d: dict) -> RunState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        state = cls(**known)
        state.requests = {r["id"]: Request.from_json(r) for r in d.get("requests", [])}
        for name in COUNTERS:
            setattr(state, name, Counter(getattr(state, name)))
        return state


@dataclass
class Throughput:
    """Generation counted between two learner steps."""

    rows: int = 0
    tokens: int = 0
    gen_s: float = 0.0  # summed over requests: the actors' time inside generation
    since: float = field(default_factory=time.perf_counter)

    def add(self, rows: int, tokens: int, gen_s: float) -> None:
        self.rows, self.tokens, self.gen_s = self.rows + rows, self.tokens + tokens, self.gen_s + gen_s

    def take(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.since, 1e-9)
        out = {"samples_per_s": self.rows / dt, "tokens_per_s": self.tokens / dt, "generate_s": self.gen_s}
        self.rows, self.tokens, self.gen_s, self.since = 0, 0, 0.0, time.perf_counter()
        return out
