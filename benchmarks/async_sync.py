"""Async vs sync: learner steps per minute of the default job with staleness bound 2 against bound 0; and
`sync_overhead`: how much the synchronous schedule's control path adds to the work it schedules.

Both are the same `Launcher` on the same config and resources (one rollout
actor, one learner rank); only `buffer.max_staleness` differs, so bound 0 is
the synchronous schedule (generate, then train, alternately). The learner's idle
fraction is 1 - (time inside its train_step and publish) / wall time, from
`learner_step_s` and `weight_sync_s` in the run's metrics; both are taken
between the first and the last step, so start-up is outside the window.

`sync_overhead` = the sync run's wall time per step / (generation time + learner step time per step), from
the same sync runs: generation is the actor's own time inside vLLM (`generate_s` in metrics.jsonl) and the
learner's is `learner_step_s`. 1.0 would mean the loop, Ray calls, the buffer and the weight handover cost
nothing; the rest is reported as the weight publish, the generator's weight load and what remains
(Ray calls, the buffer, the launcher).

    .venv/bin/python -m benchmarks.async_sync [--quick]
"""
from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path


from benchmarks.common import CACHE, module_main, ray_restart, result, spread
from launch.config import RunConfig, load_config
from launch.loop import Launcher
from launch.model import build_default_model


class StepClock(threading.Thread):
    """Stamps each metrics.jsonl line as it appears (the file carries no clock). Watching the file rather
    than hooking the launcher keeps this independent of the loop's internals."""

    def __init__(self, path: Path, poll_s: float = 0.01):
        super().__init__(daemon=True)
        self.path, self.poll_s, self.stop = path, poll_s, threading.Event()
        self.times: dict[int, float] = {}  # step -> perf_counter when its line appeared

    def run(self) -> None:
        seen = 0
        while not self.stop.is_set():
            if self.path.exists():
                lines = self.path.read_text().splitlines()
                now = time.perf_counter()
                for line in lines[seen:]:
                    if line.endswith("}"):
                        row = json.loads(line)
                        if "learner_step_s" in row:
                            self.times.setdefault(row["step"], now)
                        seen += 1
                    else:
                        break  # a half-written last line: read it again next time
            time.sleep(self.poll_s)


def run_job(cfg: RunConfig, model_path: str) -> tuple[dict, list[dict], list[float]]:
    """(summary, per-step metrics, seconds at which each step's line appeared) of one run; Ray is restarted after."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        clock = StepClock(Path(tmp) / "metrics.jsonl")
        clock.start()
        launcher = Launcher(cfg, Path(tmp), model_path)
        try:
            summary = launcher.run()
        finally:
            ray_restart()  # every actor the launcher started goes with the session, whatever it keeps them in
            time.sleep(2 * clock.poll_s)
            clock.stop.set()
            clock.join()
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "learner_step_s" in r]
    return summary, records, [clock.times[r["step"]] for r in records]


def steady_rate(records: list[dict], times: list[float]) -> tuple[float, float]:
    """(steps/min, learner idle fraction) between the first and the last step: engine start-up and the
    first step's compile are outside the window, for both schedules alike."""
    window = times[-1] - times[0]
    busy = sum(r["learner_step_s"] + (r["weight_sync_s"] or 0.0) for r in records[1:])
    return 60 * (len(records) - 1) / window, max(1 - busy / window, 0.0)


def job_config(max_staleness: int, steps: int, quick: bool) -> RunConfig:
    overrides = {"buffer.max_staleness": max_staleness, "learner.total_steps": steps, "progress": False,
                 "tensorboard": False, "learner.publish_every": 1}
    if quick:
        overrides |= {"data.max_operand": 4, "model.warm_start_steps": 30}
    return load_config("configs/default.yaml", overrides)


def measure(max_staleness: int, steps: int, quick: bool) -> dict:
    cfg = job_config(max_staleness, steps, quick)
    model_path = build_default_model(cfg.model, cfg.data.max_operand, CACHE)
    summary, records, times = run_job(cfg, model_path)
    rate, idle = steady_rate(records, times)
    return {"max_staleness": max_staleness, "steps": summary["steps"], "wall_s": summary["wall_s"],
            "steps_per_min": round(rate, 2), "learner_idle_fraction": round(idle, 3),
            "staleness_max": summary["staleness_max"], "reward_last": summary["reward_last"],
            **step_parts(records, times)}


def step_parts(records: list[dict], times: list[float]) -> dict:
    """Seconds per step between the first and the last step, and the parts of it that are measured work."""
    steps = records[1:]
    mean = lambda key: sum(r.get(key) or 0.0 for r in steps) / len(steps)  # noqa: E731
    step_s = (times[-1] - times[0]) / len(steps)
    parts = {"step_s": step_s, "generate_s": mean("generate_s"), "learner_step_s": mean("learner_step_s"),
             "weight_sync_s": mean("weight_sync_s"), "weight_load_s": mean("weight_load_s")}
    parts["other_s"] = step_s - sum(v for k, v in parts.items() if k != "step_s")
    return {k: round(v, 4) for k, v in parts.items()}


def run(quick: bool) -> list[dict]:
    steps, repeats = (6, 1) if quick else (40, 2)
    samples = []
    for _ in range(repeats):  # interleaved, so drifting load on the machine hits both
        samples.append({"async": measure(2, steps, quick), "sync": measure(0, steps, quick)})
    value = statistics.median(s["async"]["steps_per_min"] for s in samples)
    baseline = statistics.median(s["sync"]["steps_per_min"] for s in samples)
    speed = result("async_vs_sync", value, baseline, "learner steps/min", 1.3, samples,
                   spread=spread([s["async"]["steps_per_min"] / s["sync"]["steps_per_min"] for s in samples]),
                   learner_idle_fraction={k: statistics.median(s[k]["learner_idle_fraction"] for s in samples)
                                          for k in ("async", "sync")},
                   config={"job": "configs/default.yaml", "steps": steps, "async_max_staleness": 2, "sync_max_staleness": 0})
    syncs = [s["sync"] for s in samples]
    work = [s["generate_s"] + s["learner_step_s"] for s in syncs]
    overhead = result("sync_overhead", statistics.median(s["step_s"] for s in syncs), statistics.median(work),
                      "s/step", 1.25, syncs, lower_is_better=True,
                      spread=spread([s["step_s"] / w for s, w in zip(syncs, work)]),
                      where={k: statistics.median(s[k] for s in syncs) for k in syncs[0] if k.endswith("_s")},
                      config={"job": "configs/default.yaml", "steps": steps, "max_staleness": 0, "publish_every": 1})
    return [speed, overhead]


if __name__ == "__main__":
    module_main(run, __doc__)
