"""The tiny-judge hook: every `rewards.models.<name>` without a path gets the tiny judge of its kind for
synthetic:arithmetic (launch/judges.py), built or reused once the policy model is resolved and before any actor
starts, and checked like a judge the config names. launch/reward_check.py has already refused an unset path where
no training source is synthetic:arithmetic (the tiny judges know sums and nothing else)."""
from __future__ import annotations

import os

from actors.reward_config import RewardsConfig, judge_problem, model_name
from launch import judges
from launch.reward_check import ARITHMETIC


def judge_max_operand(data, name: str) -> int:
    """The operand range a tiny judge `name` is built for: the largest max_operand of the synthetic:arithmetic
    sources that model:<name> scores (all of them when it scores none by name, e.g. as actors.reward's default
    route); data.max_operand without data.sources. `data` is a DataConfig."""
    arith = [s for s in data.sources if s.train == ARITHMETIC]
    own = [s for s in arith if s.reward is not None and model_name(s.reward) == name]
    return max((s.max_operand or data.max_operand for s in own or arith), default=data.max_operand)


def build_missing_judges(cfg, cache_dir: str | os.PathLike) -> tuple[RewardsConfig, str | None]:
    """cfg.rewards with every unset `path` replaced by a tiny judge of its kind, built (or reused from `cache_dir`)
    now, and the first problem a built judge has (None: none) -- a broken build is refused like a wrong path,
    before any actor starts. check_rewards has already refused an unset path without arithmetic training data."""
    models = dict(cfg.rewards.models)
    for name, m in models.items():
        if m.path is not None:
            continue
        path = judges.resolve_judge_path(m.kind, None, judge_max_operand(cfg.data, name), cache_dir)
        models[name] = m.model_copy(update={"path": path})
        if problem := judge_problem(f"rewards.models.{name}.path", path):
            return cfg.rewards.model_copy(update={"models": models}), f"{problem} (the tiny judge built for it)"
    return cfg.rewards.model_copy(update={"models": models}), None
