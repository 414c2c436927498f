"""The run's rewards checked before any actor starts: every reward spec resolves (user code is loaded here, in the
driver, so a wrong path or name fails first) and every judge it names can serve (actors/reward_config.py); and
the hook that builds a tiny judge for every `rewards.models.<name>` without a path (launch/judges.py)."""
from __future__ import annotations

import os

from actors.reward_config import RewardsConfig, judge_problem, model_name, reward_model_problem
from actors.rewards import DEFAULT_ROUTE, Rewards

ARITHMETIC = "synthetic:arithmetic"


def check_rewards(cfg) -> str | None:
    """The first problem with actors.reward, data.sources[i].reward and rewards.models, as one line naming the key
    (None: none). `cfg` is a RunConfig whose actors.reward already holds the sources' routes."""
    A, D = cfg.actors, cfg.data
    try:
        Rewards(A.reward)
    except Exception as exc:  # a bad spec, or user code that fails while it is imported
        return f"config key 'actors.reward': {type(exc).__name__}: {exc}"
    routes = {DEFAULT_ROUTE: A.reward} if isinstance(A.reward, str) else A.reward
    specs = {f"data.sources[{i}].reward": s.reward for i, s in enumerate(D.sources) if s.reward}
    specs["actors.reward"] = A.reward  # after the sources: a source's own spec is named by its own key
    evaluated = {f"data.sources[{i}].eval": routes.get(s.name, routes.get(DEFAULT_ROUTE))
                 for i, s in enumerate(D.sources) if s.eval}
    if D.eval and isinstance(A.reward, str):  # with a mapping, data.eval's rows route by their own data_source
        evaluated["data.eval"] = A.reward
    arithmetic = any(s.train == ARITHMETIC for s in D.sources) if D.sources else D.train == ARITHMETIC
    return reward_model_problem(specs, cfg.rewards, A.n, evaluated, arithmetic)


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
    from launch.judges import resolve_judge_path  # torch and transformers: only when a judge is to be built

    models = dict(cfg.rewards.models)
    for name, m in models.items():
        if m.path is not None:
            continue
        path = resolve_judge_path(m.kind, None, judge_max_operand(cfg.data, name), cache_dir)
        models[name] = m.model_copy(update={"path": path})
        if problem := judge_problem(f"rewards.models.{name}.path", path):
            return cfg.rewards.model_copy(update={"models": models}), f"{problem} (the tiny judge built for it)"
    return cfg.rewards.model_copy(update={"models": models}), None
