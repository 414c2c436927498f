"""The run's rewards checked before any actor starts: every reward spec resolves (user code is loaded here, in the
driver, so a wrong path or name fails first) and every judge it names can serve (actors/reward_config.py). A judge
without a path is built later, by launch/judge_build.py."""
from __future__ import annotations

from actors.reward_config import reward_model_problem
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
