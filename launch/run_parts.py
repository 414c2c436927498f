"""The components of one run, built and torn down in one place: prompts, weight transport, replay buffer,
learner ranks, and what the rollout fleet needs to start. The event loop (launch/loop.py) drives them."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ray

from actors.actor import make_rollout_actor, place_rollout_actor
from buffer.actor import make_buffer_actor
from launch.config import RunConfig
from launch.control import ControlFile
from launch.mixture import make_stream, source_summary
from launch.run_data import RunData, prepare_prompts
from launch.fleet import RolloutFleet
from launch.judge_service import close_judges, judge_failure, judge_summary, scale_judges, start_judges
from launch.ledger import ledger, summarize
from launch.metrics import MetricsLog, read_history
from learner.actor import make_learner_ranks
from learner.mismatch import judge
from transport.registry import make_transport, transport_class

if TYPE_CHECKING:
    from launch.state import RunState


class RunParts:
    judges = None  # the judge service actor (launch/judge_service.py) when rewards.models names judges

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str, data: RunData | None = None):
        self.cfg, self.run_dir, self.model_path = cfg, run_dir, model_path
        self._mismatch_warned: set[str] = set()
        self.data = data or prepare_prompts(cfg, model_path)  # launch.train prepares it before Ray starts
        self.skipped: Counter[str] = Counter(self.data.train.skipped)  # rows skipped at load, by reason
        self.stream = make_stream(self.data.train, self.data.sources, cfg.data.seed)  # data.train, or the mixture
        self.eval_prompts = self.data.eval
        kind = transport_class(cfg.weights.transport)
        if not kind.crosses_nodes and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            raise ValueError(f"weights.transport={cfg.weights.transport} needs the learner and every generator on one "
                             "host, and this Ray cluster has several nodes: use object_store")
        # a push transport's trainer side lives on learner rank 0 (NCCL needs its GPU): built in await_learner
        self.push_backend = cfg.weights.transport if kind.pushes else None
        self.transport = None if kind.pushes else make_transport(cfg.weights.transport, run_dir=str(run_dir))
        offline_per_step = round(cfg.data.offline_fraction * cfg.learner.groups_per_step)  # whole (config check)
        self.buffer = make_buffer_actor(cfg.buffer, cfg.learner.groups_per_step, str(run_dir),
                                        offline_per_step=offline_per_step)
        self._load_offline(offline_per_step)
        self.judges, self._judges_ready = start_judges(cfg, self.buffer, run_dir)  # rewards.models' pools
        self._judge_sizes: dict[str, int] = {}
        self._judge_stats: dict = {}  # the service's counters, read when the run closes
        # a purely offline run (data.offline_fraction 1.0) starts no rollout actor, hence no vLLM engine
        self.rollout_actors = 0 if offline_per_step == cfg.learner.groups_per_step else cfg.actors.num_actors
        self.ranks = make_learner_ranks(cfg.learner, model_path=model_path, group_size=cfg.actors.n,
                                        temperature=cfg.actors.temperature, transport=self.transport)
        self.buffer_stats: dict = {}  # the buffer's newest stats (asked every ~2 s when buffer.filter is on)
        self._stats_asked, self._all_filtered_since = (-1, 0.0), None  # (step, time) of the last ask
        self._recent_filter_rate = 0.0  # buffer.filter's rate between the two newest stats (about one step)

    def initial_state(self) -> RunState:
        """A new run's state: the rows skipped at load counted (by reason, and by source for data.sources)."""
        from launch.state import RunState

        by_source = Counter({s.name: sum(s.train.skipped.values()) for s in self.data.sources})
        return RunState(skipped=self.skipped, skipped_by_source=+by_source, rollout_actors=self.rollout_actors)

    def _load_offline(self, per_step: int) -> None:
        """data.offline's groups into the buffer's offline pool, before any actor starts."""
        if not self.data.offline:
            return
        import pyarrow as pa

        table = pa.concat_tables([o.table for o in self.data.offline])
        pool = ray.get(self.buffer.add_offline.remote(table), timeout=self.cfg.ray.startup_timeout_s)
        if pool < per_step:
            raise ValueError(f"data.offline: the sources hold {pool} groups, fewer than the {per_step} each learner "
                             "batch draws (data.offline_fraction x learner.groups_per_step)")
        for o in self.data.offline:
            self.skipped.update({f"offline/{k}": v for k, v in o.skipped.items()})

    def new_actor(self, generator_id: str, placement, weights: str, version: int):
        """A rollout actor serving `version`, the weights in `weights` (the model, or a resumed run's checkpoint
        `model/`). With adapter sync it serves the base model, plus the checkpoint's adapter when resumed."""
        L = self.cfg.learner
        adapter = L.lora is not None and L.lora.sync == "adapter"
        resumed = adapter and weights != self.model_path
        return make_rollout_actor(
            self.cfg.actors, generator_id, placement, model_path=self.model_path if adapter else weights,
            max_model_len=self.cfg.model.max_model_len, transport=self.transport,
            fetch_timeout_s=self.cfg.weights.timeout_s, version=version, weight_transfer_backend=self.push_backend,
            adapter_rank=L.lora.rank if adapter else None,
            initial_adapter=str(Path(weights) / "adapter") if resumed else None, judges=self.judges)

    @property
    def rows_sink(self):
        """Where a request's rows go to be stored: the judge service when judges score rewards (it scores the
        groups they judge, then puts them), else the buffer."""
        return self.judges if self.judges is not None else self.buffer

    def judge_failure(self, error: BaseException) -> None:
        judge_failure(error, self.judges)  # raises if the judges cannot score any more

    def fleet(self, make_actor: Callable[[str, object], object]) -> RolloutFleet:
        A = self.cfg.actors
        self._fleet = RolloutFleet(make_actor, A.max_failures, place=lambda: place_rollout_actor(A))
        self._control = ControlFile(self.run_dir)  # from now on, control.json steers this fleet
        return self._fleet

    def apply_control(self, state: RunState) -> bool:
        """Follow control.json (launch.scale): resize the fleet; returns whether a stop was asked for."""
        control = self._control.poll()
        if control is None:
            return False
        n = control.rollout_actors
        if n is not None and n != state.rollout_actors and self.push_backend is not None:
            self._fleet.events.append({"event": "scale_refused", "actor": f"{n} requested",
                                       "error": f"weights.transport={self.push_backend} keeps the fleet fixed"})
        elif n is not None and n != state.rollout_actors and not self.rollout_actors:
            self._fleet.events.append({"event": "scale_refused", "actor": f"{n} requested",
                                       "error": "data.offline_fraction 1.0: a purely offline run has no rollout actors"})
        elif n is not None and n != state.rollout_actors:
            state.rollout_actors = n
            self._fleet.scale_to(n)
        scale_judges(self.judges, self.cfg, control.reward_actors, self._judge_sizes, self._fleet.events)
        return control.stop

    def await_learner(self, fleet: RolloutFleet) -> None:
        """Start-up: the learner ranks answer (and, for a push transport, every generator joined the group)."""
        R = self.cfg.ray
        try:
            ray.get([r.node_ip.remote() for r in self.ranks], timeout=R.startup_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(f"the {len(self.ranks)} learner rank(s) did not start within ray.startup_timeout_s="
                               f"{R.startup_timeout_s}s (not enough CPUs/GPUs free for learner.num_cpus/num_gpus?)") from exc
        if self._judges_ready is not None:  # judges that cannot load fail the run here, naming the actor
            ray.get(self._judges_ready, timeout=R.startup_timeout_s + 10)
        if self.push_backend is not None:
            self._connect_push_transport(fleet)

    def _connect_push_transport(self, fleet: RolloutFleet) -> None:
        """Every generator must be up to join the transfer group (an NCCL rendezvous is all or nothing)."""
        timeout = self.cfg.ray.startup_timeout_s
        starting = fleet.starting_refs()
        ready, pending = ray.wait(list(starting), num_returns=len(starting), timeout=timeout) if starting else ([], [])
        if pending:
            raise TimeoutError(f"{len(pending)} rollout actor(s) did not start within ray.startup_timeout_s={timeout}s")
        for ref in ready:
            fleet.on_ready(starting[ref])
        W = self.cfg.weights
        peers = {s.generator_id: s.actor for s in fleet.slots.values()}
        # rank 0 connects (and names a generator that does not answer within weights.timeout_s); the others
        # only learn that they publish nothing
        tp = self.cfg.actors.tensor_parallel_size  # every tensor-parallel worker of an engine receives the broadcast
        ray.get([rank.connect_generators.remote(W.transport, W.bucket_mb, W.timeout_s, peers, tp) for rank in self.ranks],
                timeout=timeout + W.timeout_s)

    def open_log(self, start_step: int, resumed_from: str | None) -> tuple[MetricsLog, list[dict]]:
        """The run's metrics log and, for a resumed run, the training records it already has."""
        cfg = self.cfg
        log = MetricsLog(self.run_dir, cfg.learner.total_steps, cfg.tensorboard, cfg.progress, start_step=start_step,
                         wandb=cfg.model_dump(mode="json") if cfg.wandb else None,
                         samples=(cfg.log_samples_every, cfg.log_samples))
        if not start_step:
            train = None if cfg.data.sources else cfg.data.train  # a mixture's are under "sources"
            log.event({"step": 0, "event": "data", "train": train, "prompts": len(self.data.train.prompts),
                       "skipped": self.data.train.skipped, "eval_prompts": len(self.data.eval),
                       "offline": {o.name: {"groups": o.groups, "rows": o.table.num_rows, "skipped": o.skipped}
                                   for o in self.data.offline},
                       "sources": {s.name: {"weight": s.weight, "prompts": len(s.train.prompts), "skipped":
                                            s.train.skipped, "eval_prompts": len(s.eval)} for s in self.data.sources}})
        if start_step:
            log.event({"step": start_step, "event": "resumed", "path": resumed_from})
        return log, read_history(self.run_dir, start_step) if start_step else []

    def check_mismatch(self, per_generator: dict, step: int, log: MetricsLog) -> None:
        """A generator whose tokens of the learner's own version get other log-probs from the learner is serving
        other weights: warned once per generator (events.jsonl, stderr), or the run stops naming it
        (learner.mismatch_abort)."""
        L = self.cfg.learner
        for gid, warning in judge(per_generator, L.mismatch_warn, L.mismatch_abort, step):
            if gid not in self._mismatch_warned:
                self._mismatch_warned.add(gid)
                log.event({"step": step, "event": "mismatch_warning", "actor": gid, "detail": warning})
                print(f"relay: warning: {warning}", file=sys.stderr)

    def publish_fleet(self, log: MetricsLog, state: RunState) -> None:
        """Fleet events into events.jsonl, and `actors.json` for operators whenever the fleet changed."""
        for event in self._fleet.events:
            log.event({"step": state.step, **event})
        if self._fleet.events or not (self.run_dir / "actors.json").exists():
            (self.run_dir / "actors.json").write_text(json.dumps({**self._fleet.snapshot(), "target": state.rollout_actors}))
        self._fleet.events.clear()

    def checkpoint(self, state: RunState, log: MetricsLog) -> None:
        from launch import checkpoint

        cfg, state.stream = self.cfg, self.stream.state()
        try:
            path = checkpoint.save(self.run_dir, state.step, self.ranks, self.buffer, state.to_json(),
                                   cfg.learner.checkpoint_keep, cfg.ray.rpc_timeout_s)
        except ray.exceptions.RayActorError as exc:  # the previous checkpoint is intact: resume from it
            raise learner_died(cfg, self.run_dir, f"the checkpoint of step {state.step}") from exc
        log.event({"step": state.step, "event": "checkpoint", "path": str(path)})

    def restore(self, path: Path, fleet_size: int) -> RunState:
        """Start-up of a resumed run, before any rollout actor exists (blocking calls are fine here): learner
        ranks, buffer and data position from checkpoint `path`. The returned state keeps only the requests
        that were open at the checkpoint and that the buffer did not record: those are re-issued. Its fleet is
        `fleet_size` actors (the config's), not the size a run was scaled to."""
        from launch import checkpoint
        from launch.state import RunState

        saved = RunState.from_json(checkpoint.load_state(path))
        steps = ray.get([r.load_checkpoint.remote(str(path / "learner")) for r in self.ranks],
                        timeout=self.cfg.ray.startup_timeout_s)
        if set(steps) != {saved.step}:
            raise RuntimeError(f"checkpoint {path}: learner ranks restored steps {steps}, launcher state says {saved.step}")
        timeout = self.cfg.ray.rpc_timeout_s
        ray.get(self.buffer.load.remote(str(path / "buffer")), timeout=timeout)
        self.stream.restore(saved.stream)
        recorded = ray.get([self.buffer.has_request.remote(i) for i in saved.requests], timeout=timeout)
        for request_id, done in zip(list(saved.requests), recorded):
            if done:
                del saved.requests[request_id]
        saved.rollout_actors = fleet_size
        return saved

    def ask_buffer_stats(self, calls, step: int) -> None:
        """buffer.filter's counts live in the buffer: ask for them after each learner step and every couple of
        seconds (a stalled learner makes no steps), without waiting; one call at a time."""
        if self.cfg.buffer.filter == "none" or calls.has("stats"):
            return
        if step != self._stats_asked[0] or time.monotonic() - self._stats_asked[1] > 2.0:
            calls.add(self.buffer.stats.remote(), "stats", self.cfg.ray.rpc_timeout_s)
            self._stats_asked = (step, time.monotonic())

    def on_buffer_stats(self, ref, call) -> None:
        """Newest buffer stats; warns (events.jsonl) once the filter has dropped every group for a long while."""
        new, old, f = ray.get(ref), self.buffer_stats, self.cfg.buffer.filter
        checked = new["filter_checked"] - old.get("filter_checked", 0)
        filtered = new[f"filtered_{f}"] - old.get(f"filtered_{f}", 0)
        if checked:
            self._recent_filter_rate = filtered / checked
        if checked > filtered:
            self._all_filtered_since = None
        elif checked and self._all_filtered_since is None:
            self._all_filtered_since = time.monotonic()
        patience = min(60.0, self.cfg.learner.sample_timeout_s / 4)  # warned well before the step fails
        since = self._all_filtered_since
        if since is not None and time.monotonic() - since > patience:
            self._fleet.events.append({"event": "filter_dropped_everything", "actor": "replay_buffer", "error":
                                       f"buffer.filter={f} dropped every group for {time.monotonic() - since:.0f}s "
                                       f"({new[f'filtered_{f}']:.0f} of {new['filter_checked']:.0f} over the run); "
                                       "learner.sample_timeout_s bounds the learner's wait"})
            self._all_filtered_since = time.monotonic()  # the next warning after another `patience`
        self.buffer_stats = new

    def filter_metrics(self) -> dict:
        """buffer.filter in the metrics line: filter_rate over the run so far, filter_rate_recent over about the
        previous step (both as of the newest stats), and the counts."""
        f, s = self.cfg.buffer.filter, self.buffer_stats
        if f == "none" or not s:
            return {}
        return {"filter_rate": s["filter_rate"], "filter_rate_recent": self._recent_filter_rate,
                f"filtered/{f}": s[f"filtered_{f}"], "filter_checked": s["filter_checked"]}

    def no_batch(self, step: int) -> TimeoutError:
        """The error of a learner step that got no batch, saying whether buffer.filter ate the groups."""
        hint, f = "", self.cfg.buffer.filter
        if f != "none":
            s = ray.get(self.buffer.stats.remote(), timeout=self.cfg.ray.rpc_timeout_s)
            hint = (f"; buffer.filter={f} dropped {s[f'filtered_{f}']:.0f} of the {s['filter_checked']:.0f} groups "
                    f"it checked ({s['filter_rate']:.0%}): prompts the policy always or never solves leave nothing "
                    "to train on; set buffer.filter none, or train on harder/easier prompts")
        return TimeoutError(f"learner step {step}: the buffer served no batch within "
                            f"{self.cfg.learner.sample_timeout_s}s (generators stalled or all prompts skipped{hint})")

    def fixed_fleet(self, generator_id: str, error: BaseException) -> RuntimeError | None:
        """The error that ends a run when a rollout actor fails and the weight transport cannot take a
        replacement (the generators joined its transfer group at start), else None."""
        if self.push_backend is None:
            return None
        return RuntimeError(f"rollout actor {generator_id} failed ({error}); with weights.transport="
                            f"{self.push_backend} the fleet is fixed at start, so it cannot be replaced: use "
                            "object_store or disk for restartable generators")

    def summary(self, state: RunState, history: list[dict], wall_s: float, start_step: int, stopped: bool) -> dict:
        """summary.json: the run's outcome, the final weights, and the ledger of every group dispatched."""
        timeout = self.cfg.ray.rpc_timeout_s
        lora = self.cfg.learner.lora  # with LoRA the adapter always, the merged model with --merge (merge_final)
        final = ray.get([r.save_pretrained.remote(str(self.run_dir / "final"), lora is None or lora.merge_final)
                         for r in self.ranks], timeout=timeout)[0]
        buffer_stats = ray.get(self.buffer.stats.remote(), timeout=timeout)
        out = summarize(history, wall_s, final, buffer_stats, dict(state.skipped))
        unfinished = sum(len(r.prompts) for r in state.requests.values())
        out["ledger"] = ledger(state.groups_dispatched, state.request_seq, state.reissued, unfinished, state.trained,
                               ray.get(self.buffer.ledger.remote(), timeout=timeout), buffer_stats,
                               self.cfg.buffer.max_reuse)
        judges = dict(self._judge_stats)  # the service's faults join the actors' own
        faults = state.reward_faults + Counter(judges.pop("reward_faults", {}))
        out.update(reward_faults=dict(faults), resumed_from_step=start_step, stopped_at_request=stopped)
        if judges:
            out["judges"] = judges
        if self.data.sources:
            out["sources"] = source_summary(self.data.sources, history, state.dispatched_by_source,
                                            state.skipped_by_source)
        return out

    def close(self) -> None:
        try:  # the run is over (the summary is written after this): keep the service's counters, then stop it
            self._judge_stats = judge_summary(self.judges, self.cfg.ray.rpc_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # a dead service: the run's own error says why
            self._judge_stats = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        close_judges(self.judges)
        if self.transport is not None:
            self.transport.close()  # e.g. the shared-memory slots in /dev/shm


def learner_died(cfg: RunConfig, run_dir: Path, during: str) -> RuntimeError:
    hint = f"; resume with: python -m launch.train --resume {run_dir}" if cfg.learner.checkpoint_every else ""
    return RuntimeError(f"a learner rank died during {during}{hint}")


def step_record(state: RunState, policy_version: int, metrics: dict, throughput: dict, last_load_s: float,
                fleet: RolloutFleet) -> dict:
    """One metrics.jsonl line: the learner's metrics plus what the launcher measured since the last step."""
    return {
        "step": state.step, "policy_version": policy_version, **metrics, **throughput,
        "weight_load_s": last_load_s, "rollout_actors": len(fleet.slots),
        "actor_restarts": sum(s.restarts for s in fleet.slots.values()),
        **{f"skipped/{k}": v for k, v in state.skipped.items()},
        **{f"reward_faults/{k}": v for k, v in state.reward_faults.items()},
        **{f"dispatched/{k}": v for k, v in state.dispatched_by_source.items()},  # groups, by data_source
        **{f"skipped_by_source/{k}": v for k, v in state.skipped_by_source.items()},
    }
