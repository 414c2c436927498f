"""Verifiable rewards. A reward function maps (response text, reference answer) to a float.

User code is loaded only from the file the config names (`path/to/file.py:fn`),
never from an import path chosen at run time.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

RewardFn = Callable[[str, str], float]

def arithmetic_reward(response: str, answer: str) -> float:
    """1.0 when the whole response (spaces aside) is the answer, else 0.0: no credit for a right number among others."""
    return float("".join(response.split()) == answer.strip())


def math_verify_reward(response: str, answer: str) -> float:
    """Symbolic equivalence of the final answer (e.g. a \\boxed{} expression), via math-verify."""
    from math_verify import parse, verify

    gold, pred = parse(answer), parse(response)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


BUILTIN: dict[str, RewardFn] = {"arithmetic": arithmetic_reward, "math_verify": math_verify_reward}


def resolve_reward(spec: str) -> RewardFn:
    """A builtin name, or `file.py:function` naming user code by its path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
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


def safe_reward(fn: RewardFn, response: str, answer: str) -> tuple[float, str]:
    """Score, turning an exception or a non-finite value into 0.0 with the reason recorded."""
    try:
        value = float(fn(response, answer))
    except Exception as exc:  # user code: any failure is bad data, counted, not fatal
        return 0.0, f"reward_error:{type(exc).__name__}"
    if not math.isfinite(value):
        return 0.0, "reward_nonfinite"
    return value, ""
