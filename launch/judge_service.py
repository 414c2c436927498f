"""The run's judge service (actors/judge_pool.py): started with the buffer, resized from control.json, summed up in
summary.json, stopped with the run. Only runs whose `rewards.models` name a judge start one."""
from __future__ import annotations

import ray

from actors.judge_pool import JudgeFailedError, make_judge_service
from launch.config import RunConfig


def start_judges(cfg: RunConfig, buffer, run_dir) -> tuple[object | None, object | None]:
    """(the service actor, the ObjectRef of its start-up: every pool has a judge ready), or (None, None)."""
    models = {name: (m, m.path) for name, m in cfg.rewards.models.items()}
    if not models:
        return None, None
    service = make_judge_service(models, buffer, str(run_dir), cfg.ray.startup_timeout_s)
    return service, service.start.remote()


def scale_judges(service, cfg: RunConfig, asked: dict[str, int], current: dict[str, int], events: list) -> None:
    """control.json's `reward_actors` ({model: n}) for the models whose size changed; unknown names are refused."""
    for name, n in asked.items():
        if name not in cfg.rewards.models or service is None:
            events.append({"event": "scale_refused", "actor": f"judge {name}",
                           "error": f"rewards.models has no {name!r} (has {sorted(cfg.rewards.models)})"})
        elif current.get(name, cfg.rewards.models[name].num_actors) != n:
            current[name] = n
            service.scale.remote(name, n)  # the service supervises; its answer is not needed here
            events.append({"event": "judges_scaled", "actor": f"judge {name}", "to": n})


def judge_failure(error: BaseException, service=None) -> None:
    """A put's acknowledgement failed: if the judge service gave up on a judge (max_failures in a row) or died
    itself, stop the run with an error naming it; anything else is a lost request, re-issued by the launcher."""
    cause = getattr(error, "cause", None)
    if isinstance(error, JudgeFailedError) or isinstance(cause, JudgeFailedError):
        raise RuntimeError(str(cause or error)) from error
    if service is not None and isinstance(error, ray.exceptions.RayActorError) and \
            getattr(error, "actor_id", None) == service._actor_id.hex():  # nothing would score a re-issued request
        raise RuntimeError(f"the judge service died ({str(error).splitlines()[0]}); resume the run to restart it") from error


def judge_summary(service, timeout_s: float) -> dict:
    """The service's counters (rows judged, re-scored chunks, actor failures, faults by reason), or {}."""
    if service is None:
        return {}
    return ray.get(service.stats.remote(), timeout=timeout_s)


def close_judges(service, timeout_s: float = 30.0) -> None:
    if service is None:
        return
    try:
        ray.get(service.close.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # killed below either way
    ray.kill(service, no_restart=True)
