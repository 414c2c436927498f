"""The one training loop: sync and async are settings (buffer.max_staleness), not two loops.

The launcher is an event loop over Ray futures. It hands prompt requests to idle
rollout actors when the buffer admits them (the staleness bound), starts a
learner step whenever the learner is idle (its batch is an ObjectRef of the
buffer's sample, resolved by Ray in the learner, never in this process), and
passes the newest weight handle with every generation request, so generators
pick up new weights at their next request without the learner waiting.

It also keeps the run alive and honest: a rollout actor that dies or overruns
`ray.rpc_timeout_s` is killed, replaced and its request re-issued under the same
id (the buffer refuses a second copy); the fleet follows `<run dir>/control.json`
(written by `python -m launch.scale`); checkpoints every
`learner.checkpoint_every` steps make `--resume` continue exactly; and a ledger
accounts for every prompt group dispatched.
"""
from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from actors.actor import make_rollout_actor
from actors.generator import GenerationResult, Prompt
from buffer.actor import make_buffer_actor
from launch import checkpoint
from launch.config import RunConfig
from launch.data import PromptStream, load_prompts
from launch.fleet import RolloutFleet
from launch.ledger import ledger, summarize
from launch.metrics import MetricsLog, read_history
from learner.actor import make_learner_ranks
from transport.weights import PUSH_TRANSPORTS, WeightHandle, make_transport

CONTROL = "control.json"  # {"rollout_actors": N}: the live fleet size, written by launch.scale


@dataclass
class Request:
    """One generation request: the unit of admission, dispatch and re-issue."""

    id: str
    prompts: list[Prompt]
    actor: int = -1
    dispatched_at: float = 0.0
    attempts: int = 0
    offered_version: int = 0  # the newest weights the request was sent with


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
    """Starts every component of a run and drives it to `learner.total_steps`; `resume=True` continues a run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str, resume: bool = False):
        self.cfg, self.run_dir, self.model_path = cfg, run_dir, model_path
        prompt_set = load_prompts(cfg.data.train, cfg.data.max_operand)
        self.skipped: Counter[str] = Counter(prompt_set.skipped)
        self.stream = PromptStream(prompt_set.prompts, cfg.data.seed)
        self.eval_prompts = load_prompts(cfg.data.eval, cfg.data.max_operand).prompts if cfg.data.eval else []
        # a push transport's trainer side lives on learner rank 0 (NCCL needs its GPU); it is connected in run()
        self.push = cfg.weights.transport in PUSH_TRANSPORTS
        if cfg.weights.transport == "shared_memory" and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            raise ValueError("weights.transport=shared_memory needs the learner and every generator on one host, and "
                             "this Ray cluster has several nodes: use object_store")
        self.transport = None if self.push else make_transport(cfg.weights.transport, str(run_dir))
        self.buffer = make_buffer_actor(cfg.buffer, cfg.learner.groups_per_step, str(run_dir))
        self.ranks = make_learner_ranks(cfg.learner, model_path=model_path, group_size=cfg.actors.n,
                                        temperature=cfg.actors.temperature, transport=self.transport)
        self.version, self.policy_version, self.handle = 0, 0, None
        self.serving_path = model_path  # what a freshly started generator loads
        self.pending: deque[Request] = deque()  # admitted requests waiting for an actor (re-issues first)
        self.inflight: dict = {}  # ObjectRef -> Request
        self.offers: dict = {}  # in_flight mode: ObjectRef of offer_weights -> generator id
        self.request_seq, self.groups_dispatched, self.reissued = 0, 0, 0
        self.trained: Counter[str] = Counter()
        self.reward_faults: Counter[str] = Counter()
        self.last_load_s = 0.0
        self.throughput = Throughput()
        if resume:
            self._restore(checkpoint.latest(run_dir))
        self.fleet = RolloutFleet(self._new_actor, cfg.actors.max_failures)
        self.fleet_target = cfg.actors.num_actors
        (run_dir / CONTROL).unlink(missing_ok=True)  # a stale request from a previous process must not resize us
        self._control_mtime, self.stop_requested = 0.0, False
        self.fleet.scale_to(self.fleet_target)

    def _new_actor(self, generator_id: str):
        return make_rollout_actor(self.cfg.actors, generator_id, model_path=self.serving_path,
                                  max_model_len=self.cfg.model.max_model_len, buffer=self.buffer,
                                  transport=self.transport, fetch_timeout_s=self.cfg.weights.timeout_s,
                                  version=self.policy_version,
                                  weight_transfer_backend=self.cfg.weights.transport if self.push else None)

    # ---- dispatch -----------------------------------------------------------------------------
    def _admit_new_requests(self, n_idle: int) -> None:
        P = self.cfg.actors.prompts_per_request
        while len(self.pending) < n_idle and ray.get(self.buffer.try_admit.remote(P), timeout=self.cfg.ray.rpc_timeout_s):
            self.pending.append(Request(f"req-{self.request_seq:09d}", self.stream.take(P)))
            self.request_seq += 1
            self.groups_dispatched += P

    def _dispatch_generation(self) -> None:
        idle = self.fleet.idle()
        self._admit_new_requests(len(idle))
        while idle and self.pending:
            req, i = self.pending.popleft(), idle.pop(0)
            req.actor, req.dispatched_at, req.attempts = i, time.monotonic(), req.attempts + 1
            req.offered_version = self.policy_version
            ref = self.fleet.busy(i).generate.remote(req.prompts, self.handle, self.cfg.ray.rpc_timeout_s, req.id)
            self.inflight[ref] = req

    def _dispatch_learning(self) -> list:
        L = self.cfg.learner
        batch = self.buffer.sample.remote(L.groups_per_step, self.version, L.sample_timeout_s)
        next_step = self.version + 1
        publish = next_step % L.publish_every == 0 and next_step < L.total_steps
        self.learning_since = time.monotonic()
        return [rank.train_step.remote(batch, publish) for rank in self.ranks]

    # ---- completion ---------------------------------------------------------------------------
    def _on_generation_done(self, ref) -> None:
        req = self.inflight.pop(ref)
        try:
            result: GenerationResult = ray.get(ref, timeout=self.cfg.ray.rpc_timeout_s)
        except ray.exceptions.RayError as exc:
            self._on_generation_failed(req, exc)
            return
        self.fleet.on_success(req.actor, result.version, req.offered_version)
        if result.duplicate:
            return  # the original already reached the buffer: nothing to count twice
        missing = len(req.prompts) - result.groups
        if missing:  # groups that will never arrive give their admission slots back
            self.buffer.release.remote(missing)
        self.skipped.update(result.skipped)
        self.reward_faults.update(result.reward_faults)
        self.throughput.rows += result.groups * self.cfg.actors.n
        self.throughput.tokens += result.tokens
        self.last_load_s = result.load_s or self.last_load_s

    def _on_generation_failed(self, req: Request, error: BaseException) -> None:
        """Replace the actor, then re-issue its request unless the buffer already recorded it."""
        if self.push:  # the generators joined the transfer group at start; a replacement could not receive pushes
            raise RuntimeError(f"rollout actor {self.fleet.slots[req.actor].generator_id} failed ({error}); with "
                               f"weights.transport={self.cfg.weights.transport} the fleet is fixed at start, so it "
                               "cannot be replaced: use object_store or disk for restartable generators") from error
        self.fleet.on_failure(req.actor, error)  # raises after actors.max_failures in a row
        if not ray.get(self.buffer.has_request.remote(req.id), timeout=self.cfg.ray.rpc_timeout_s):
            self.pending.appendleft(req)
            self.reissued += 1

    def _check_deadlines(self) -> None:
        """A generation overrunning ray.rpc_timeout_s means a stuck actor: fail it (kill, replace, re-issue)."""
        now, limit = time.monotonic(), self.cfg.ray.rpc_timeout_s
        for ref, req in list(self.inflight.items()):
            if now - req.dispatched_at > limit:
                del self.inflight[ref]
                actor = self.fleet.slots[req.actor].generator_id
                self._on_generation_failed(req, TimeoutError(f"rollout actor {actor}: request {req.id} "
                                                             f"unanswered after ray.rpc_timeout_s={limit}s"))
        learn_limit = limit + self.cfg.learner.sample_timeout_s
        if self.learning and now - self.learning_since > learn_limit:
            raise TimeoutError(f"learner step {self.version + 1}: no answer from the learner ranks within "
                               f"{learn_limit:.0f}s (ray.rpc_timeout_s + learner.sample_timeout_s)")

    def _on_learner_step(self, log: MetricsLog) -> dict:
        try:
            results = ray.get(self.learning, timeout=self.cfg.ray.rpc_timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise self._learner_died(f"step {self.version + 1}") from exc
        res = results[0]
        if res is None:
            raise TimeoutError(f"learner step {self.version + 1}: the buffer served no batch within "
                               f"{self.cfg.learner.sample_timeout_s}s (generators stalled or all prompts skipped)")
        self.version = res["step"]
        self.trained.update(res["group_ids"])
        if res["handle"] is not None:
            self.handle: WeightHandle = res["handle"]
            self.policy_version = self.handle.version
            self._offer_weights()
        self.buffer.set_learner_version.remote(self.version)
        samples_per_s, tokens_per_s = self.throughput.take()
        record = {
            "step": self.version, "policy_version": self.policy_version,
            **res["metrics"], "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
            "weight_load_s": self.last_load_s, "rollout_actors": len(self.fleet.slots),
            "actor_restarts": sum(s.restarts for s in self.fleet.slots.values()),
            **{f"skipped/{k}": v for k, v in self.skipped.items()},
            **{f"reward_faults/{k}": v for k, v in self.reward_faults.items()},
        }
        log.log(record)
        return record

    def _offer_weights(self) -> None:
        """in_flight mode: every live engine applies the new version now, mid-generation. (The handle also goes
        with every request, which covers actors started later and offers that failed.)"""
        if self.cfg.actors.weight_update_mode != "in_flight":
            return
        for slot in self.fleet.slots.values():
            if slot.state in ("idle", "busy"):
                self.offers[slot.actor.offer_weights.remote(self.handle)] = slot.generator_id

    def _collect_offers(self) -> None:
        if not self.offers:
            return
        done, _ = ray.wait(list(self.offers), num_returns=len(self.offers), timeout=0)
        for ref in done:
            actor = self.offers.pop(ref)
            try:
                self.last_load_s = ray.get(ref) or self.last_load_s
            except ray.exceptions.RayError as exc:  # a dead actor is handled through its generate call
                self.fleet.events.append({"event": "offer_failed", "actor": actor, "error": type(exc).__name__})

    # ---- control and persistence --------------------------------------------------------------
    def _apply_control(self) -> None:
        path = self.run_dir / CONTROL
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        try:
            control = json.loads(path.read_text())
            n = int(control.get("rollout_actors", self.fleet_target))
        except (ValueError, TypeError, AttributeError):
            return  # a malformed file: launch.scale writes atomically, so this is someone else's
        if n >= 1 and n != self.fleet_target and self.push:
            self.fleet.events.append({"event": "scale_refused", "actor": f"{n} requested",
                                      "error": f"weights.transport={self.cfg.weights.transport} keeps the fleet fixed"})
        elif n >= 1 and n != self.fleet_target:
            self.fleet_target = n
            self.fleet.scale_to(n)
        if control.get("stop"):
            self.stop_requested = True

    def _publish_fleet(self, log: MetricsLog) -> None:
        for event in self.fleet.events:
            log.event({"step": self.version, **event})
        if self.fleet.events or not (self.run_dir / "actors.json").exists():
            (self.run_dir / "actors.json").write_text(json.dumps({**self.fleet.snapshot(), "target": self.fleet_target}))
        self.fleet.events.clear()

    def _state(self) -> dict:
        requests = list(self.pending) + list(self.inflight.values())
        return {"step": self.version, "policy_version": self.policy_version, "stream": self.stream.state(),
                "request_seq": self.request_seq, "groups_dispatched": self.groups_dispatched, "reissued": self.reissued,
                "requests": [asdict(r) for r in requests], "skipped": dict(self.skipped), "trained": dict(self.trained),
                "reward_faults": dict(self.reward_faults),
                "rollout_actors": self.fleet_target}

    def _learner_died(self, during: str) -> RuntimeError:
        hint = f"; resume with: python -m launch.train --resume {self.run_dir}" if self.cfg.learner.checkpoint_every else ""
        return RuntimeError(f"a learner rank died during {during}{hint}")

    def _checkpoint(self, log: MetricsLog) -> None:
        cfg = self.cfg
        try:
            path = checkpoint.save(self.run_dir, self.version, self.ranks, self.buffer, self._state(),
                                   cfg.learner.checkpoint_keep, cfg.ray.rpc_timeout_s)
        except ray.exceptions.RayActorError as exc:  # the previous checkpoint is intact: resume from it
            raise self._learner_died(f"the checkpoint of step {self.version}") from exc
        log.event({"step": self.version, "event": "checkpoint", "path": str(path)})

    def _restore(self, path: Path) -> None:
        s = checkpoint.load_state(path)
        timeout = self.cfg.ray.rpc_timeout_s
        steps = ray.get([r.load_checkpoint.remote(str(path / "learner")) for r in self.ranks], timeout=self.cfg.ray.startup_timeout_s)
        if set(steps) != {s["step"]}:
            raise RuntimeError(f"checkpoint {path}: learner ranks restored steps {steps}, launcher state says {s['step']}")
        ray.get(self.buffer.load.remote(str(path / "buffer")), timeout=timeout)
        self.version, self.policy_version = s["step"], s["policy_version"]
        self.serving_path = str(path / "model")  # generators start on exactly the checkpoint's weights
        self.stream.restore(s["stream"])
        self.request_seq, self.groups_dispatched, self.reissued = s["request_seq"], s["groups_dispatched"], s["reissued"]
        self.skipped, self.trained = Counter(s["skipped"]), Counter(s["trained"])
        self.reward_faults = Counter(s.get("reward_faults", {}))
        for r in s["requests"]:  # in flight at the checkpoint: re-issue unless the buffer already holds it
            req = Request(r["id"], [Prompt(**p) for p in r["prompts"]], attempts=r["attempts"])
            if not ray.get(self.buffer.has_request.remote(req.id), timeout=timeout):
                self.pending.append(req)
        self.resumed_from = str(path)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        try:
            ray.get([r.node_ip.remote() for r in self.ranks], timeout=cfg.ray.startup_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(f"the {len(self.ranks)} learner rank(s) did not start within ray.startup_timeout_s="
                               f"{cfg.ray.startup_timeout_s}s (not enough CPUs/GPUs free for learner.num_cpus/num_gpus?)") from exc
        if self.push:
            self._connect_push_transport()
        start_step = self.version
        log = MetricsLog(self.run_dir, cfg.learner.total_steps, cfg.tensorboard, cfg.progress, start_step=start_step,
                         wandb=cfg.model_dump(mode="json") if cfg.wandb else None)
        if start_step:
            log.event({"step": start_step, "event": "resumed", "path": self.resumed_from})
        self.learning: list = []
        history = read_history(self.run_dir, start_step) if start_step else []
        t0 = time.perf_counter()
        self.throughput = Throughput()
        try:
            while self.version < cfg.learner.total_steps and not self.stop_requested:
                self._apply_control()
                self._dispatch_generation()
                if not self.learning:
                    self.learning = self._dispatch_learning()
                starting = self.fleet.starting_refs()
                ready, _ = ray.wait([self.learning[0], *self.inflight, *starting], num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in starting:
                        self.fleet.on_ready(starting[ref])
                    elif ref in self.inflight:
                        self._on_generation_done(ref)
                    else:
                        history.append(self._on_learner_step(log))
                        self.learning = []
                        self._after_step(log)
                self._check_deadlines()
                self._collect_offers()
                self._publish_fleet(log)
            if self.stop_requested:
                history += self._stop_learning(log)
            self._drain()
        finally:
            self._publish_fleet(log)  # also the events of a failing run: they say why it stopped
            log.close()
            self.fleet.close_all(timeout_s=30)
            if self.transport is not None and self.transport.name == "shared_memory":
                self.transport.close()  # the slots in /dev/shm
        wall = time.perf_counter() - t0
        final = ray.get([r.save_pretrained.remote(str(self.run_dir / "final")) for r in self.ranks],
                        timeout=cfg.ray.rpc_timeout_s)[0]
        buffer_stats = ray.get(self.buffer.stats.remote(), timeout=cfg.ray.rpc_timeout_s)
        summary = summarize(history, wall, final, buffer_stats, dict(self.skipped))
        summary["reward_faults"] = dict(self.reward_faults)
        summary["ledger"] = self._ledger(buffer_stats)
        summary["resumed_from_step"] = start_step
        summary["stopped_at_request"] = self.stop_requested
        return summary

    def _stop_learning(self, log: MetricsLog) -> list[dict]:
        """A stop request: finish the step under way, write a checkpoint to resume from, then wind down."""
        records = []
        if self.learning:
            ray.wait([self.learning[0]], timeout=self.cfg.ray.rpc_timeout_s + self.cfg.learner.sample_timeout_s)
            records.append(self._on_learner_step(log))
            self.learning = []
        if self.cfg.learner.checkpoint_every:
            self._checkpoint(log)
        log.event({"step": self.version, "event": "stopped"})
        return records

    def _connect_push_transport(self) -> None:
        """Every generator must be up to join the transfer group (an NCCL rendezvous is all or nothing)."""
        deadline = time.monotonic() + self.cfg.ray.startup_timeout_s
        while starting := self.fleet.starting_refs():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(starting)} rollout actor(s) did not start within ray.startup_timeout_s")
            ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=1.0)
            for ref in ready:
                self.fleet.on_ready(starting[ref])
        W = self.cfg.weights
        peers = {s.generator_id: s.actor for s in self.fleet.slots.values()}
        ray.get(self.ranks[0].connect_generators.remote(W.transport, W.bucket_mb, W.timeout_s, peers),
                timeout=self.cfg.ray.startup_timeout_s)
        for rank in self.ranks[1:]:  # the others only need to know they publish nothing
            ray.get(rank.connect_generators.remote(W.transport, W.bucket_mb, W.timeout_s, peers))

    def _after_step(self, log: MetricsLog) -> None:
        k = self.cfg.learner.checkpoint_every
        if k and self.version % k == 0 and self.version < self.cfg.learner.total_steps:
            self._checkpoint(log)
        self._maybe_evaluate(log)

    def _drain(self) -> None:
        """Let the generations in flight finish, so the ledger accounts for every group dispatched."""
        deadline = time.monotonic() + self.cfg.ray.rpc_timeout_s
        while self.inflight and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                req = self.inflight[ref]
                self._on_generation_done(ref)
                if self.pending and self.pending[0] is req:  # its actor died at the very end: not re-issued now
                    self.pending.popleft()

    def _ledger(self, buffer_stats: dict) -> dict:
        unfinished = sum(len(r.prompts) for r in (*self.pending, *self.inflight.values()))
        return ledger(self.groups_dispatched, self.request_seq, self.reissued, unfinished, self.trained,
                      ray.get(self.buffer.ledger.remote(), timeout=self.cfg.ray.rpc_timeout_s), buffer_stats,
                      self.cfg.buffer.max_reuse)

    def _maybe_evaluate(self, log: MetricsLog) -> None:
        k = self.cfg.data.eval_every
        idle = self.fleet.idle() or sorted(self.fleet.slots)
        if k and self.eval_prompts and self.version % k == 0 and idle:
            actor = self.fleet.slots[idle[0]].actor
            metrics = ray.get(actor.evaluate.remote(self.eval_prompts, self.handle), timeout=self.cfg.ray.rpc_timeout_s)
            log.log_eval(self.version, metrics)
