"""Multi-node on one host: Ray's own `cluster_utils.Cluster` starts several raylets here, each a node with its own
CPUs and custom resources, and a real run (vLLM generators, DeepSpeed ranks over gloo, the buffer) spreads over them.
Custom resources stand for node types: `trainer` nodes hold learner ranks, `rollout` nodes hold generators."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow

BASE = ["--data.max_operand", "4", "--progress", "false", "--tensorboard", "false", "--actors.n", "4",
        "--actors.prompts_per_request", "4", "--learner.groups_per_step", "4", "--learner.micro_batch_groups", "2",
        "--actors.num_cpus", "0.5", "--actors.resources", "{rollout: 1}", "--learner.num_ranks", "2",
        "--learner.num_cpus", "1", "--learner.resources", "{trainer: 1}", "--learner.checkpoint_every", "0"]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # the driver's node: launcher and buffer
    yield c
    ray.shutdown()
    c.shutdown()


def _launcher(cluster, tmp_path, tiny_model_dir, *overrides):
    import ray
    import yaml

    from launch.loop import Launcher

    cfg = load_config(None, parse_overrides(["--model.path", tiny_model_dir, "--output_dir", str(tmp_path), *BASE,
                                             *overrides]))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if not ray.is_initialized():
        ray.init(address=cluster.address)
    return Launcher(cfg, run_dir, tiny_model_dir)


def _node_of(actor) -> str:
    import ray

    return ray.get(actor.node_id.remote(), timeout=120)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_until_stop = lambda: False  # noqa: E731  the run ended: nothing more will happen


def _until(predicate, timeout=600.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if _until_stop():
            raise AssertionError(f"the run ended while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_across_nodes_survives_losing_a_node_and_grows_onto_a_new_one(cluster, tmp_path, tiny_model_dir):
    """Learner ranks SPREAD over two trainer nodes, generators on two rollout nodes, weights between them through
    the object store. The rollout node holding gen-0 is removed mid-run: its actors are replaced on the other one.
    A node added later takes the actor `launch.scale` adds. Nothing is lost or trained twice."""
    import threading

    from launch.scale import request

    trainers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    rollout_nodes = [cluster.add_node(num_cpus=1, resources={"rollout": 2}) for _ in range(2)]
    cluster.wait_for_nodes()
    launcher = _launcher(cluster, tmp_path, tiny_model_dir, "--learner.placement_strategy", "SPREAD",
                         "--learner.total_steps", "5000", "--actors.num_actors", "2", "--buffer.max_staleness", "1")
    run_dir = launcher.run_dir
    trainer_ids = {n.node_id for n in trainers}
    rank_nodes = [_node_of(r) for r in launcher.ranks]
    assert set(rank_nodes) == trainer_ids, rank_nodes  # SPREAD: one rank on each trainer node
    seen: dict = {}

    def operate():  # from outside the launcher, as an operator or the cluster would
        metrics = run_dir / "metrics.jsonl"
        _until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, what="step 3")
        seen["before"] = {s.generator_id: _node_of(s.actor) for s in launcher.fleet.slots.values()}
        doomed = next(n for n in rollout_nodes if n.node_id == seen["before"]["gen-0"])
        survivor = next(n for n in rollout_nodes if n is not doomed)
        cluster.remove_node(doomed, allow_graceful=False)
        lost = sum(node == doomed.node_id for node in seen["before"].values())
        _until(lambda: sum(e["event"] == "actor_restarted" for e in _events(run_dir)) >= lost
               and all(s.state != "starting" for s in launcher.fleet.slots.values()), what="replacements")
        seen["replaced"] = {s.generator_id: _node_of(s.actor) for s in launcher.fleet.slots.values()}
        seen["survivor"] = survivor.node_id
        new_node = cluster.add_node(num_cpus=1, resources={"rollout": 1})
        seen["new"] = new_node.node_id
        request(run_dir, 3)
        _until(lambda: any(e["event"] == "actor_first_result" and e["actor"] == "gen-2" for e in _events(run_dir)),
               what="the added actor's first result")
        seen["grown"] = {s.generator_id: _node_of(s.actor) for s in launcher.fleet.slots.values()}
        request(run_dir, stop=True)

    # The launcher runs in a thread: Ray adds and removes nodes only from the main thread (it installs signal handlers).
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=_guarded_run(launcher, result)), daemon=True)
    runner.start()
    _guard(operate, seen, run_dir, stop_if=lambda: not runner.is_alive())
    runner.join(timeout=600)
    assert "error" not in result, result["error"]
    assert seen.get("error") is None, seen["error"]
    summary = result["summary"]
    rollout_ids = {n.node_id for n in rollout_nodes}
    assert set(seen["before"].values()) <= rollout_ids  # generators only where `rollout` is
    assert set(seen["replaced"].values()) == {seen["survivor"]}, seen  # everything now on the remaining rollout node
    assert seen["grown"]["gen-2"] == seen["new"], seen  # the added actor on the node added during the run
    ledger = summary["ledger"]
    assert ledger["groups_lost"] == 0 and ledger["groups_trained_too_often"] == 0, ledger
    assert ledger["requests_recorded"] == ledger["requests_dispatched"], ledger
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    assert max(r["behaviour_version_max"] for r in rows) >= 3  # newer weights reached generators on other nodes
    assert max(r["staleness_max"] for r in rows) <= 1


def _guarded_run(launcher, result: dict):
    try:
        return launcher.run()
    except BaseException as exc:
        result["error"] = repr(exc)


def _guard(fn, seen: dict, run_dir: Path, stop_if) -> None:
    """Run the operator's script; a failure in it is recorded for the test and stops the run instead of hanging it."""
    from launch.scale import request

    global _until_stop
    _until_stop = stop_if
    try:
        fn()
    except BaseException as exc:
        seen["error"] = repr(exc)
        request(run_dir, stop=True)


def test_pack_keeps_ranks_together_and_shared_memory_is_refused_across_nodes(cluster, tmp_path, tiny_model_dir):
    """PACK places both learner ranks on one trainer node when one can hold them; a single-host transport on a
    multi-node cluster is refused before any actor starts, naming the fix."""
    import ray

    from launch.cluster import ClusterError, check_fits
    from launch.train import resource_requests

    for _ in range(2):
        cluster.add_node(num_cpus=2, resources={"trainer": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    with pytest.raises(ValueError, match="needs the learner and every generator on one host"):
        _launcher(cluster, tmp_path, tiny_model_dir, "--weights.transport", "shared_memory")
    cfg = load_config(None, parse_overrides(["--model.path", tiny_model_dir, *BASE, "--actors.resources", "{gpu_pool: 1}"]))
    with pytest.raises(ClusterError, match="'actors.num_cpus/num_gpus/resources'.*gpu_pool"):
        check_fits(resource_requests(cfg), ray.nodes())  # a resource no node has: refused, not waited for
    from learner.actor import make_learner_ranks

    ranks = make_learner_ranks(cfg.learner.model_copy(update={"placement_strategy": "PACK"}), model_path=tiny_model_dir,
                               group_size=4, temperature=1.0, transport=None)
    nodes = {_node_of(r) for r in ranks}
    assert len(nodes) == 1, nodes
