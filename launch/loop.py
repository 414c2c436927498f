"""The one training loop: sync and async are settings (buffer.max_staleness), not two loops.

An event loop over Ray futures (launch/calls.py): admission, generation, the buffer's acknowledgement of each
put, learner steps, evaluation and actor start-up are calls with deadlines behind one `ray.wait`, so nothing
on the hot path blocks on one actor. The learner steps whenever it is idle (its batch is an ObjectRef of the
buffer's sample, resolved in the learner, never here); idle rollout actors get admitted requests with the
newest weight handle and apply it at their next request, so the learner never waits for them. A request's put is
submitted with it (`actors.actor.start_request`): rows go actor -> buffer, the launcher owns and waits for the ack.

Runs stay alive and honest: a dead or overdue rollout actor is replaced and its request re-issued under the same
id unless the buffer recorded it; the fleet follows control.json; `--resume` continues exactly; a ledger counts all.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import ray

from actors.actor import start_request
from actors.generator import GenerationResult
from launch import checkpoint
from launch.calls import Call, Calls
from launch.config import RunConfig
from launch.run_parts import RunParts, learner_died, step_record
from launch.state import Request, Throughput
from transport.base import WeightHandle

FINISHING = ("generate", "ack", "recorded", "evaluate")  # calls the end of a run waits for


class Launcher:
    """Starts every component of a run and drives it to `learner.total_steps`; `resume=True` continues a run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str, resume: bool = False, data=None):
        self.cfg, self.run_dir = cfg, run_dir
        self.parts = RunParts(cfg, run_dir, model_path, data)  # buffer, learner ranks, transport, prompts
        self.buffer, self.ranks, self.transport = self.parts.buffer, self.parts.ranks, self.parts.transport
        self.state = self.parts.initial_state()
        self.handle: WeightHandle | None = None  # the newest published weights
        self.calls, self.start_step, self.serving_path, self.resumed_from = Calls(), 0, model_path, None
        self.queue: deque[str] = deque()  # admitted requests waiting for an actor (re-issues first)
        self.learning: list = []  # the learner ranks' ObjectRefs of the step under way
        self.eval_due: int | None = None  # the step whose held-out evaluation waits for an idle actor
        self.refused_at: tuple | None = None  # (step, releases, time) sent with the last refused admission
        self.releases, self.last_load_s, self.throughput, self.stop_requested = 0, 0.0, Throughput(), False
        self.handlers = {"ready": lambda ref, call: self.fleet.on_ready_of(*call.data), "admit": self._on_admit,
                         "generate": self._on_generate, "ack": self._on_ack, "recorded": self._on_recorded,
                         "learn": self._on_learn, "evaluate": self._on_evaluate, "offer": self._on_offer,
                         "stats": self.parts.on_buffer_stats}
        if resume:  # from the checkpoint's weights; its open requests that the buffer did not record go first
            path = checkpoint.latest(run_dir)
            self.state = self.parts.restore(path, fleet_size=self.state.rollout_actors)
            self.start_step, self.resumed_from, self.serving_path = self.state.step, str(path), str(path / "model")
            self.queue = deque(self.state.requests)
        self.fleet = self.parts.fleet(self._new_actor)
        self.fleet.scale_to(self.state.rollout_actors)

    @property
    def policy_version(self) -> int:
        """The newest published version, else the weights a fresh generator loads (the start, or a checkpoint)."""
        return self.handle.version if self.handle is not None else self.start_step

    def _new_actor(self, generator_id: str, placement):
        # it holds serving_path's weights, version start_step: a newer handle loads at its first request (labelled
        # with the newest version, a replacement would serve the start's weights under it and never load it)
        return self.parts.new_actor(generator_id, placement, self.serving_path, self.start_step)

    # ---- scheduling: start whatever can start now; completions: handle whatever finished -----------
    def _watch_starting(self) -> None:
        for ref, i in self.fleet.starting_refs().items():
            if not self.calls.knows(ref):
                self.calls.add(ref, "ready", self.cfg.ray.startup_timeout_s, (i, self.fleet.slots[i].generator_id))

    def _schedule(self) -> None:  # generation before learning: under a sync schedule a step waits for its batch
        self._watch_starting()
        self._start_eval()
        self._dispatch()
        if len(self.fleet.places(self.cfg.actors.requests_per_actor)) > len(self.queue) \
                and not self.calls.has("admit") and self._admission_may_open():
            asked = (self.state.step, self.releases, time.monotonic())
            ahead = int(self.state.step + 1 < self.cfg.learner.total_steps)  # a sync run's next step, as this trains
            admit = self.buffer.reserve.remote(self.cfg.actors.prompts_per_request, self.state.step, ahead)
            self.calls.add(admit, "admit", self.cfg.ray.rpc_timeout_s, asked)
        if not self.learning:
            self._start_learning()
        self.parts.ask_buffer_stats(self.calls, self.state.step)  # buffer.filter's rate, for the metrics line

    def _dispatch(self, early: bool = False) -> None:
        """Queued requests to actors with room (`actors.requests_per_actor` each) once the learner reached the step
        each was admitted for (`early`: now, the run winds down); while an evaluation waits for an idle actor, the
        first live one gets no more, so it drains."""
        for i in self.fleet.places(self.cfg.actors.requests_per_actor, self.eval_due is not None)[:len(self.queue)]:
            if self.state.requests[self.queue[0]].start_step > self.state.step and not early:
                break  # reserved a step ahead (`buffer.reserve`): it starts with the weights that step publishes
            req = self.state.requests[self.queue.popleft()]
            req.actor, req.generator_id = i, self.fleet.slots[i].generator_id
            req.attempts, req.offered_version = req.attempts + 1, self.policy_version
            ref, ack = start_request(self.fleet.busy(i), self.parts.rows_sink, req.prompts, self.handle, req.id)
            self.calls.add(ref, "generate", self.cfg.ray.rpc_timeout_s, (req, ack))

    def _admission_may_open(self) -> bool:
        """After a refusal, ask again once the learner stepped or groups were given back (the buffer also frees
        slots when it drops stale groups, which only it sees: hence also once a second)."""
        step, releases, at = self.refused_at or (None, None, None)
        return at is None or (step, releases) != (self.state.step, self.releases) or time.monotonic() - at > 1.0

    def _start_eval(self) -> None:
        """A due evaluation goes to an idle actor only: a busy one would answer after its request."""
        if self.eval_due is not None and (idle := self.fleet.idle()):
            call = (idle[0], self.eval_due, self.fleet.slots[idle[0]].generator_id)
            ref, self.eval_due = self.fleet.busy(idle[0]).evaluate.remote(self.parts.eval_prompts, self.handle), None
            self.calls.add(ref, "evaluate", self.cfg.ray.rpc_timeout_s, call)

    def _start_learning(self) -> None:
        L, step = self.cfg.learner, self.state.step
        batch = self.buffer.sample.remote(L.groups_per_step, step, L.sample_timeout_s)
        publish = L.publish_every != "never" and (step + 1) % L.publish_every == 0 and step + 1 < L.total_steps
        self.learning = [rank.train_step.remote(batch, publish) for rank in self.ranks]
        self.calls.add(self.learning[0], "learn", self.cfg.ray.rpc_timeout_s + L.sample_timeout_s)

    def _on_admit(self, ref, call: Call) -> None:
        if (start_step := ray.get(ref)) is not None:
            req = self.state.new_request(self.parts.stream.take(self.cfg.actors.prompts_per_request), start_step)
            self.queue.append(req.id)
            self.refused_at = None
            self._dispatch()  # now: the run may end before the next turn, and admitted groups must not wait
        else:
            self.refused_at = call.data  # what the buffer was told when it said no

    def _on_generate(self, ref, call: Call) -> None:
        req, ack = call.data
        try:
            result = GenerationResult.of(ray.get(ref))
        except ray.exceptions.RayError as exc:
            return self._generation_failed(req, ack, exc)
        if self.fleet.holds(req.actor, req.generator_id):  # else: it was replaced meanwhile, its work still counts
            self.fleet.on_success(req.actor, result.version, req.offered_version)
        self.calls.add(ack, "ack", self.cfg.ray.rpc_timeout_s, (req, result))

    def _on_ack(self, ref, call: Call) -> None:
        req, result = call.data
        try:
            stored = ray.get(ref)
        except ray.exceptions.RayError as exc:  # no rows (the generation failed), or the answer was lost
            self.parts.judge_failure(exc)  # or the judge service gave up on a judge: that stops the run
            return self._ask_recorded(req, result)
        self._close(req, result if stored >= 0 else None)  # < 0: a copy of this request was already stored
        if result is not None:  # the buffer gave slots back (stale, filtered): admit again now
            self.releases += 0 <= stored < result.groups

    def _ask_recorded(self, req: Request, result: GenerationResult | None) -> None:
        self.calls.add(self.buffer.has_request.remote(req.id), "recorded", self.cfg.ray.rpc_timeout_s, (req, result))

    def _on_recorded(self, ref, call: Call) -> None:
        req, result = call.data
        if ray.get(ref):
            self._close(req, result)
        elif req.id in self.state.requests:  # lost with its actor: the same id again, so a late copy is refused
            self.queue.appendleft(req.id)
            self.state.reissued += 1

    def _close(self, req: Request, result: GenerationResult | None) -> None:
        """The buffer holds request `req`; count what its generation produced (None: counted elsewhere)."""
        self.state.requests.pop(req.id, None)
        if result is None:
            return
        if missing := len(req.prompts) - result.groups:  # groups that never arrive give their admission back
            self.buffer.release.remote(missing)
            self.releases += 1
        self.state.count(result)  # skipped (by reason and by source), reward faults
        self.log.keep_samples(result.samples)
        self.throughput.add(result.groups * self.cfg.actors.n, result.tokens, result.gen_s)
        self.last_load_s = result.load_s or self.last_load_s

    def _generation_failed(self, req: Request, ack, error: BaseException) -> None:
        """Replace the actor, then re-issue its request unless its put landed (the ack says, or else the buffer)."""
        if (fixed := self.parts.fixed_fleet(req.generator_id, error)) is not None:
            raise fixed from error
        if self.fleet.holds(req.actor, req.generator_id):  # its other queued requests fail the same way: once
            self.fleet.on_failure(req.actor, error)  # raises after actors.max_failures in a row
        self.calls.add(ack, "ack", self.cfg.ray.rpc_timeout_s, (req, None))

    def _on_learn(self, ref, call: Call | None) -> dict:
        try:
            results = ray.get(self.learning, timeout=self.cfg.ray.rpc_timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise learner_died(self.cfg, self.run_dir, f"step {self.state.step + 1}") from exc
        if (res := results[0]) is None:
            raise self.parts.no_batch(self.state.step + 1)
        self.learning, self.state.step = [], res["step"]
        self.state.trained.update(res["group_ids"])
        self.parts.check_mismatch(res.get("mismatch") or {}, self.state.step, self.log)
        if res["handle"] is not None:
            self.handle = res["handle"]
            self._offer_weights()
        if (every := self.cfg.data.eval_every) and self.parts.eval_prompts and self.state.step % every == 0:
            self.eval_due = self.state.step
        k, going_on = self.cfg.learner.checkpoint_every, self.state.step < self.cfg.learner.total_steps
        save = k and self.state.step % k == 0 and going_on
        if call is not None and going_on and not (save or self.stop_requested):  # a checkpoint sees no new call
            self._schedule()  # the next step's calls go out before this one is recorded
        record = step_record(self.state, self.policy_version, {**res["metrics"], **self.parts.filter_metrics()},
                             self.throughput.take(), self.last_load_s, self.fleet)
        self.log.log(record)
        if save:
            self._checkpoint()
        return record

    def _checkpoint(self) -> None:  # an admission on its way is counted in the buffer: the state must hold it too
        self.calls.settle("admit", self.cfg.ray.rpc_timeout_s, self._on_admit)
        self.parts.checkpoint(self.state, self.log)

    def _on_evaluate(self, ref, call: Call) -> None:
        index, step, generator_id = call.data
        try:
            self.log.log_eval(step, ray.get(ref))
        except ray.exceptions.RayError as exc:
            return self.fleet.on_failure(index, exc) if self.fleet.holds(index, generator_id) else None
        if self.fleet.holds(index, generator_id):
            self.fleet.on_idle(index)

    def _offer_weights(self) -> None:
        """in_flight mode: every live engine applies the new version now, mid-generation (the handle also goes
        with every request, for actors started later and offers that failed)."""
        if self.cfg.actors.weight_update_mode == "in_flight":
            for ref, actor in self.fleet.offer_weights(self.handle).items():
                self.calls.add(ref, "offer", self.cfg.weights.timeout_s, actor)

    def _on_offer(self, ref, call: Call) -> None:
        try:
            self.last_load_s = ray.get(ref) or self.last_load_s
        except ray.exceptions.RayError as exc:  # a dead actor is handled through its generate call
            self.fleet.events.append({"event": "offer_failed", "actor": call.data, "error": type(exc).__name__})

    def _on_overdue(self, ref, call: Call) -> None:
        late = f"unanswered after {call.deadline - call.since:.0f}s"
        if call.kind == "generate":
            (req, ack), limit = call.data, self.cfg.ray.rpc_timeout_s
            self._generation_failed(req, ack, TimeoutError(
                f"rollout actor {req.generator_id}: request {req.id} unanswered after ray.rpc_timeout_s={limit:g}s"))
        elif call.kind in ("ready", "evaluate"):  # a stuck engine: replace it (unless that happened already)
            index, generator_id = call.data[0], call.data[-1]
            if self.fleet.holds(index, generator_id):
                self.fleet.on_failure(index, TimeoutError(f"rollout actor {generator_id}: {call.kind} {late}"))
        elif call.kind == "ack":  # its answer may be gone with the actor that made the put: ask the buffer
            self._ask_recorded(*call.data)
        elif call.kind == "offer":
            self.fleet.events.append({"event": "offer_failed", "actor": call.data, "error": f"TimeoutError: {late}"})
        else:  # the learner or the buffer: nothing to replace them with
            raise TimeoutError(f"{call.kind} (learner step {self.state.step + 1}) {late} "
                               "(ray.rpc_timeout_s, + learner.sample_timeout_s for a learner step)")

    def run(self) -> dict:
        self.parts.await_learner(self.fleet)
        self.log, history = self.parts.open_log(self.start_step, self.resumed_from)
        t0, self.throughput = time.perf_counter(), Throughput()
        try:
            while self.state.step < self.cfg.learner.total_steps and not self.stop_requested:
                self.stop_requested = self.parts.apply_control(self.state) or self.stop_requested
                self._schedule()
                for ref, call in self.calls.wait(timeout_s=1.0):
                    if (record := self.handlers[call.kind](ref, call)) is not None:
                        history.append(record)
                for ref, call in self.calls.overdue():
                    self._on_overdue(ref, call)
                self.parts.publish_fleet(self.log, self.state)
            history += self._stop_learning() if self.stop_requested else []
            self._drain()
        finally:
            self.parts.publish_fleet(self.log, self.state)  # also the events of a failing run: they say why it stopped
            self.log.close()
            self.fleet.close_all(timeout_s=30)
            self.parts.close()
        return self.parts.summary(self.state, history, time.perf_counter() - t0, self.start_step, self.stop_requested)

    def _stop_learning(self) -> list[dict]:
        """A stop request: finish the step under way, write a checkpoint to resume from, then wind down."""
        records = []
        if self.learning:
            ray.wait([self.learning[0]], timeout=self.cfg.ray.rpc_timeout_s + self.cfg.learner.sample_timeout_s)
            records.append(self._on_learn(self.learning[0], None))
        if self.cfg.learner.checkpoint_every:
            self._checkpoint()
        self.log.event({"step": self.state.step, "event": "stopped"})
        return records

    def _drain(self) -> None:
        """Let admitted requests, puts and a due evaluation finish, so the ledger accounts for every group
        dispatched and the last step's evaluation is logged; nothing new is admitted or learned."""
        self.calls.drop("admit", "learn", "offer")
        deadline = time.monotonic() + self.cfg.ray.rpc_timeout_s
        while time.monotonic() < deadline and (any(map(self.calls.has, FINISHING)) or (
                self.fleet.slots and (self.eval_due is not None or self.queue))):
            self._watch_starting()
            self._start_eval()
            self._dispatch(early=True)
            for ref, call in self.calls.wait(timeout_s=1.0):
                self.handlers[call.kind](ref, call)
