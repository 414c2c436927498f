"""Async vs sync: learner steps per minute of the default job with staleness bound 2 against bound 0.

Both are the same `Launcher` on the same config and resources (one rollout
actor, one learner rank); only `buffer.max_staleness` differs, so bound 0 is
the synchronous schedule (generate, then train, alternately). The learner's idle
fraction is 1 - (time inside its train_step and publish) / wall time, from
`learner_step_s` and `weight_sync_s` in the run's metrics; both are taken
between the first and the last step, so start-up is outside the window.

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
            "staleness_max": summary["staleness_max"], "reward_last": summary["reward_last"]}


def run(quick: bool) -> dict:
    steps, repeats = (6, 1) if quick else (40, 2)
    samples = []
    for _ in range(repeats):  # interleaved, so drifting load on the machine hits both
        samples.append({"async": measure(2, steps, quick), "sync": measure(0, steps, quick)})
    value = statistics.median(s["async"]["steps_per_min"] for s in samples)
    baseline = statistics.median(s["sync"]["steps_per_min"] for s in samples)
    return result("async_vs_sync", value, baseline, "learner steps/min", 1.3, samples,
                  spread=spread([s["async"]["steps_per_min"] / s["sync"]["steps_per_min"] for s in samples]),
                  learner_idle_fraction={k: statistics.median(s[k]["learner_idle_fraction"] for s in samples)
                                         for k in ("async", "sync")},
                  config={"job": "configs/default.yaml", "steps": steps, "async_max_staleness": 2, "sync_max_staleness": 0})


if __name__ == "__main__":
    module_main(run, __doc__)
