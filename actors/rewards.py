"""Verifiable rewards: builtins, user functions named by file, batched calls, and routing by `data_source`.

A reward is a Python function. What it is given follows its parameter names (verl's `compute_score` and its
batched reward manager use the same names, so their functions work unchanged):

    per sample: response | solution_str, answer | ground_truth, prompt, messages, metadata | extra_info,
                data_source  -> a float
    batched:    responses | solution_strs, answers | ground_truths, prompts, messages_list,
                metadatas | extra_infos, data_sources  -> a list of floats, one per sample

`prompt` is the prompt's text (for a chat, its last user turn), `messages` the chat (a text prompt as one user
turn), `metadata` the row's other fields. A function with `**kwargs` is given every name of its kind. A function
of two positional parameters with other names keeps today's convention, `fn(response, answer)`. A parameter
that is none of these fails when the spec is resolved (the launcher does that before any actor starts).

User code is loaded only from the file the config names (`path/to/file.py:fn`), never from an import path chosen
at run time. `actors.reward` may be one spec or a mapping data_source -> spec with an optional `default`.

`model:<name>` names a learned judge of `rewards.models` (actors/judge.py). Its rows are scored as whole groups (a
preference model ranks a group's samples against each other), either here through `Rewards.judge` (evaluation, or
an actor that holds its judges) or, `defer=True`, left to the judge service (actors/judge_pool.py).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from actors.prompts import Prompt
from actors.reward_config import model_name

RewardFn = Callable[..., Any]
DEFAULT_ROUTE = "default"  # the key of a reward mapping that scores every source without its own entry

# parameter name -> what it receives (per sample; the batched names receive the list of the same)
PER_SAMPLE = {"response": "response", "solution_str": "response", "answer": "answer", "ground_truth": "answer",
              "prompt": "prompt", "messages": "messages", "metadata": "metadata", "extra_info": "metadata",
              "data_source": "data_source"}
BATCHED = {"responses": "response", "solution_strs": "response", "answers": "answer", "ground_truths": "answer",
           "prompts": "prompt", "messages_list": "messages", "metadatas": "metadata", "extra_infos": "metadata",
           "data_sources": "data_source"}


def arithmetic_reward(response: str, answer: str) -> float:
    """1.0 when the whole response (spaces aside) is the answer, else 0.0: no credit for a right number among others."""
    return float("".join(response.split()) == answer.strip())


_GSM8K_FINAL = re.compile(r"####\s*(.+)")


def _final_answer(text: str) -> str:
    """GSM8K writes the final answer after `#### ` (its reference solutions, and models trained on them); the
    rest of the text (a \\boxed{} expression, a bare number) is left to math-verify's own extraction."""
    match = _GSM8K_FINAL.search(text)
    return match.group(1).strip().replace(",", "") if match else text


def math_verify_reward(response: str, answer: str) -> float:
    """Symbolic equivalence of the final answers, via math-verify: `\\boxed{}` expressions, plain numbers and
    GSM8K's `#### 42`, in the reference and in the response."""
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only the main thread may set (in_flight actors are threaded)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_final_answer(answer), parsing_timeout=timeout)
    pred = parse(_final_answer(response), parsing_timeout=timeout)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout))


BUILTIN: dict[str, RewardFn] = {"arithmetic": arithmetic_reward, "math_verify": math_verify_reward}


@dataclass(frozen=True)
class Reward:
    """A resolved reward function and how to call it."""

    spec: str
    fn: RewardFn
    batched: bool
    names: tuple[str, ...]  # keyword names it is called with; () = positional (response, answer)

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """Raw scores, one per sample (may raise: `score` turns failures into counted zeros)."""
        if self.batched:
            table = BATCHED
            out = self.fn(**{n: [_value(table[n], p, r) for p, r in zip(prompts, responses)] for n in self.names})
            out = list(out)
            if len(out) != len(responses):
                raise RewardLengthError(f"{len(out)} scores for {len(responses)} responses")
            return out
        return [self.one(p, r) for p, r in zip(prompts, responses)]

    def one(self, prompt: Prompt, response: str) -> float:
        """A per-sample reward's raw score of one sample."""
        if not self.names:
            return self.fn(response, prompt.answer)
        return self.fn(**{n: _value(PER_SAMPLE[n], prompt, response) for n in self.names})


class RewardLengthError(ValueError):
    """A batched reward returned a list of the wrong length."""


def _value(what: str, prompt: Prompt, response: str) -> Any:
    if what == "response":
        return response
    if what == "messages":
        return prompt.chat()
    if what == "prompt":
        return prompt.text
    return getattr(prompt, what)  # answer, metadata, data_source


def calling_convention(fn: RewardFn, spec: str) -> tuple[bool, tuple[str, ...]]:
    """(batched, names) from `fn`'s parameter names; see the module docstring."""
    params = list(inspect.signature(fn).parameters.values())
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in named]
    for table, batched in ((PER_SAMPLE, False), (BATCHED, True)):
        if names and all(n in table for n in names):
            chosen = {n for n in names} | ({_first_name(table, w) for w in set(table.values())} if var_kw else set())
            return batched, tuple(sorted(chosen))
    required = [p for p in named if p.default is p.empty]
    if len(required) == 2 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in required):
        return False, ()  # fn(response, answer): the convention before rewards saw the prompt
    unknown = [n for n in names if n not in PER_SAMPLE and n not in BATCHED]
    raise ValueError(f"reward {spec!r}: cannot tell what to pass to parameter(s) {unknown or names}; name them from "
                     f"{sorted(PER_SAMPLE)} (one sample), or {sorted(BATCHED)} (a batch, return a list), or take "
                     "exactly two positional parameters (response, answer)")


def _first_name(table: dict[str, str], what: str) -> str:
    return next(n for n, w in table.items() if w == what)


def _load_user_fn(spec: str) -> RewardFn:
    if ":" not in spec:
        raise ValueError(f"reward {spec!r}: not one of {sorted(BUILTIN)} and not of the form path/to/file.py:function")
    path, fn_name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise ValueError(f"reward {spec!r}: file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"relay_user_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {path} has no function {fn_name}")
    return fn


@dataclass(frozen=True)
class JudgeRoute:
    """A reward spec naming a learned judge: `model:<name>`."""

    spec: str
    name: str


# judge name, groups of (chat, responses) -> rewards per group (actors/judge.py's Judge.score_groups, or the service)
JudgeFn = Callable[[str, list[tuple[list[dict], list[str]]]], list[list[tuple[float, str]]]]


def resolve_reward(spec: str) -> Reward | JudgeRoute:
    """A builtin name, `file.py:function` naming user code by its path, or `model:<name>` naming a judge."""
    if (name := model_name(spec)) is not None:
        if not name:
            raise ValueError(f"reward {spec!r}: name a model of rewards.models after 'model:'")
        return JudgeRoute(spec, name)
    fn = BUILTIN[spec] if spec in BUILTIN else _load_user_fn(spec)
    batched, names = calling_convention(fn, spec)
    return Reward(spec, fn, batched, names)


class Rewards:
    """The run's rewards: one for every row, or one per data_source (a mapping, `default` for the others)."""

    def __init__(self, spec: str | dict[str, str], judge: JudgeFn | None = None):
        specs = {DEFAULT_ROUTE: spec} if isinstance(spec, str) else dict(spec)
        if not specs:
            raise ValueError("actors.reward: an empty mapping (give a spec, or data_source: spec entries)")
        self.routes = {source: resolve_reward(s) for source, s in specs.items()}
        self.judge = judge  # scores model:<name> rows when they are not deferred to the judge service

    def route(self, data_source: str) -> Reward | JudgeRoute | None:
        return self.routes.get(data_source) or self.routes.get(DEFAULT_ROUTE)

    def unrouted(self, sources) -> list[str]:
        """The sources no reward scores (the launcher refuses data with any before an actor starts)."""
        return sorted(s for s in set(sources) if self.route(s) is None)

    def score(self, prompts: list[Prompt], responses: list[str], defer: bool = False) -> list[tuple[float, str] | None]:
        """(reward, "" or why it is 0) per sample: each source's rows in one call of its reward. A reward that
        raises, returns the wrong number of scores or a non-finite value scores 0 with the reason recorded.
        Rows a judge scores are None with `defer` (the judge service scores them), else scored through `judge`."""
        out: list[tuple[float, str] | None] = [(0.0, "")] * len(responses)
        by_source: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_source.setdefault(p.data_source, []).append(i)
        for source, rows in by_source.items():
            reward = self.route(source)
            if reward is None:
                for i in rows:
                    out[i] = (0.0, f"reward_unrouted:{source}")
                continue
            if isinstance(reward, JudgeRoute):
                for i, scored in zip(rows, [None] * len(rows) if defer else self._judged(reward, prompts, responses, rows)):
                    out[i] = scored
                continue
            for i, scored in zip(rows, _safe(reward, [prompts[i] for i in rows], [responses[i] for i in rows])):
                out[i] = scored
        return out

    def _judged(self, route: JudgeRoute, prompts: list[Prompt], responses: list[str],
                rows: list[int]) -> list[tuple[float, str]]:
        """The rows' judge scores, now. Consecutive rows of one Prompt are one group (a request's n samples)."""
        if self.judge is None:
            raise RuntimeError(f"reward {route.spec!r}: this generator holds no judge service to score with")
        groups: list[list[int]] = []
        for i in rows:
            if groups and prompts[groups[-1][-1]] is prompts[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        try:
            scored = self.judge(route.name, [(prompts[g[0]].chat(), [responses[i] for i in g]) for g in groups])
        except Exception as exc:  # the judges failed as a whole (rows that fail alone are scored 0 by the judge)
            return [(0.0, f"reward_error:{type(exc).__name__}")] * len(rows)
        return [s for group in scored for s in group]


def _safe(reward: Reward, prompts: list[Prompt], responses: list[str]) -> list[tuple[float, str]]:
    if not reward.batched:  # one sample's failure costs that sample only
        return [safe_reward(reward, p, r) for p, r in zip(prompts, responses)]
    try:
        values = reward(prompts, responses)
    except Exception as exc:  # user code: any failure is bad data, counted, not fatal
        return [(0.0, f"reward_error:{type(exc).__name__}")] * len(responses)
    return [_finite(v) for v in values]


def safe_reward(reward: Reward, prompt: Prompt, response: str) -> tuple[float, str]:
    """One sample's score, turning an exception or a non-finite value into 0.0 with the reason recorded."""
    try:
        value = reward([prompt], [response])[0] if reward.batched else reward.one(prompt, response)
    except Exception as exc:  # user code: any failure is bad data, counted, not fatal
        return 0.0, f"reward_error:{type(exc).__name__}"
    return _finite(value)


def _finite(value) -> tuple[float, str]:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        return 0.0, f"reward_error:{type(exc).__name__}"
    return (value, "") if math.isfinite(value) else (0.0, "reward_nonfinite")
