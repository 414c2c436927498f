"""The one training loop: sync and async are settings (buffer.max_staleness), not two loops.

The launcher is an event loop over Ray futures. It hands prompt batches to idle
rollout actors when the buffer admits them (the staleness bound), starts a
learner step whenever the learner is idle (its batch is an ObjectRef of the
buffer's sample, resolved by Ray in the learner, never in this process), and
passes the newest weight handle with every generation request, so generators
pick up new weights at their next request without the learner waiting.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.actor import make_rollout_actor
from actors.generator import GenerationResult, Prompt
from buffer.actor import make_buffer_actor
from launch.config import RunConfig
from launch.data import PromptStream, load_prompts
from launch.metrics import MetricsLog
from learner.actor import make_learner_ranks
from transport.weights import WeightHandle, make_transport


@dataclass
class Throughput:
    """Generation counted between two learner steps."""

    rows: int = 0
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)

    def take(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.since, 1e-9)
        out = (self.rows / dt, self.tokens / dt)
        self.rows, self.tokens, self.since = 0, 0, time.perf_counter()
        return out


class Launcher:
    """Starts every component of a run and drives it to `learner.total_steps`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str):
        self.cfg, self.run_dir, self.model_path = cfg, run_dir, model_path
        prompt_set = load_prompts(cfg.data.train, cfg.data.max_operand)
        self.skipped: dict[str, int] = dict(prompt_set.skipped)
        self.stream = PromptStream(prompt_set.prompts, cfg.data.seed)
        self.eval_prompts = load_prompts(cfg.data.eval, cfg.data.max_operand).prompts if cfg.data.eval else []
        self.transport = make_transport(cfg.weights.transport, str(run_dir))
        self.buffer = make_buffer_actor(cfg.buffer, cfg.learner.groups_per_step, str(run_dir))
        self.ranks = make_learner_ranks(cfg.learner, model_path=model_path, group_size=cfg.actors.n,
                                        temperature=cfg.actors.temperature, transport=self.transport)
        self.actors = [self._new_actor(i) for i in range(cfg.actors.num_actors)]
        self.version, self.handle = 0, None
        self.throughput = Throughput()

    def _new_actor(self, index: int):
        return make_rollout_actor(self.cfg.actors, index, model_path=self.model_path, max_model_len=self.cfg.model.max_model_len,
                                  buffer=self.buffer, transport=self.transport, fetch_timeout_s=self.cfg.weights.timeout_s)

    # ---- dispatch -----------------------------------------------------------------------------
    def _dispatch_generation(self, idle: list[int], inflight: dict) -> None:
        P = self.cfg.actors.prompts_per_request
        while idle and ray.get(self.buffer.try_admit.remote(P), timeout=self.cfg.ray.rpc_timeout_s):
            i = idle.pop(0)
            prompts = self.stream.take(P)
            ref = self.actors[i].generate.remote(prompts, self.handle, self.cfg.ray.rpc_timeout_s)
            inflight[ref] = ("generate", i, prompts)

    def _dispatch_learning(self) -> list:
        L = self.cfg.learner
        batch = self.buffer.sample.remote(L.groups_per_step, self.version, L.sample_timeout_s)
        next_step = self.version + 1
        publish = next_step % L.publish_every == 0 and next_step < L.total_steps
        return [rank.train_step.remote(batch, publish) for rank in self.ranks]

    # ---- completion ---------------------------------------------------------------------------
    def _on_generation(self, result: GenerationResult, prompts: list[Prompt]) -> None:
        missing = len(prompts) - result.groups
        if missing:  # groups that will never arrive give their admission slots back
            self.buffer.release.remote(missing)
        for reason, n in result.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.throughput.rows += result.groups * self.cfg.actors.n
        self.throughput.tokens += result.tokens
        self.last_load_s = result.load_s or getattr(self, "last_load_s", 0.0)

    def _on_learner_step(self, results: list, log: MetricsLog) -> dict:
        res = results[0]
        if res is None:
            raise TimeoutError(f"learner step {self.version + 1}: the buffer served no batch within "
                               f"{self.cfg.learner.sample_timeout_s}s (generators stalled or all prompts skipped)")
        self.version = res["step"]
        if res["handle"] is not None:
            self.handle: WeightHandle = res["handle"]
        self.buffer.set_learner_version.remote(self.version)
        samples_per_s, tokens_per_s = self.throughput.take()
        m = res["metrics"]
        record = {
            "step": self.version, "policy_version": self.handle.version if self.handle else 0,
            **m, "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
            "weight_load_s": getattr(self, "last_load_s", 0.0),
            **{f"skipped/{k}": v for k, v in self.skipped.items()},
        }
        log.log(record)
        return record

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        ray.get([a.version.remote() for a in self.actors] + [r.node_ip.remote() for r in self.ranks],
                timeout=cfg.ray.rpc_timeout_s)  # every engine is up before the clock starts
        log = MetricsLog(self.run_dir, cfg.learner.total_steps, cfg.tensorboard, cfg.progress)
        idle, inflight = list(range(len(self.actors))), {}
        learning: list = []
        history: list[dict] = []
        t0 = time.perf_counter()
        self.throughput = Throughput()
        try:
            while self.version < cfg.learner.total_steps:
                self._dispatch_generation(idle, inflight)
                if not learning:
                    learning = self._dispatch_learning()
                ready, _ = ray.wait([learning[0], *inflight], num_returns=1, timeout=cfg.ray.rpc_timeout_s)
                if not ready:
                    raise TimeoutError(f"no learner step or generation finished within ray.rpc_timeout_s={cfg.ray.rpc_timeout_s}s")
                ref = ready[0]
                if ref == learning[0]:
                    history.append(self._on_learner_step(ray.get(learning, timeout=cfg.ray.rpc_timeout_s), log))
                    learning = []
                    self._maybe_evaluate(log)
                else:
                    _, i, prompts = inflight.pop(ref)
                    self._on_generation(ray.get(ref), prompts)
                    idle.append(i)
        finally:
            log.close()
        wall = time.perf_counter() - t0
        final = ray.get([r.save_pretrained.remote(str(self.run_dir / "final")) for r in self.ranks])[0]
        buffer_stats = ray.get(self.buffer.stats.remote())
        return summarize(history, wall, final, buffer_stats, self.skipped)

    def _maybe_evaluate(self, log: MetricsLog) -> None:
        k = self.cfg.data.eval_every
        if k and self.eval_prompts and self.version % k == 0:
            metrics = ray.get(self.actors[0].evaluate.remote(self.eval_prompts, self.handle))
            log.file.write(json.dumps({"step": self.version, **metrics}) + "\n")


def summarize(history: list[dict], wall_s: float, final_dir: str, buffer_stats: dict, skipped: dict) -> dict:
    k = max(len(history) // 5, 1)
    first = sum(h["reward_mean"] for h in history[:k]) / k
    last = sum(h["reward_mean"] for h in history[-k:]) / k
    return {
        "steps": len(history), "wall_s": round(wall_s, 1), "reward_first": round(first, 4), "reward_last": round(last, 4),
        "staleness_max": max(h["staleness_max"] for h in history), "final_checkpoint": final_dir,
        "samples_per_s": round(sum(h["samples_per_s"] for h in history) / len(history), 1),
        "buffer": {k: v for k, v in buffer_stats.items() if isinstance(v, (int, float))}, "skipped": skipped,
    }
