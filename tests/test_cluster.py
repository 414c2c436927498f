"""Joining a cluster and checking it can hold the run: errors that name the address or the key, in bounded time."""
from __future__ import annotations

import socket
import time

import pytest

from launch.cluster import ClusterError, check_fits, check_reachable, gcs_endpoint
from launch.config import load_config
from launch.train import main, resource_requests


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_addresses_are_parsed_or_refused_by_name():
    assert gcs_endpoint("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert gcs_endpoint("auto") is None and gcs_endpoint("ray://head:10001") is None
    with pytest.raises(ClusterError, match="dashboard's job-submission address"):
        gcs_endpoint("http://127.0.0.1:8265")
    with pytest.raises(ClusterError, match="expected host:port"):
        gcs_endpoint("head-node")


def test_an_address_nobody_answers_on_fails_fast_naming_it():
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at {address}"):
        check_reachable(address, timeout_s=5)
    assert time.monotonic() - t0 < 5


def test_main_refuses_an_unreachable_cluster_before_starting_anything(tmp_path, tiny_model_dir, capsys):
    rc = main(["--ray.address", f"127.0.0.1:{_closed_port()}", "--ray.connect_timeout_s", "2",
               "--model.path", tiny_model_dir, "--output_dir", str(tmp_path / "out")])
    assert rc == 2 and "cannot reach the Ray cluster" in capsys.readouterr().err


def test_a_request_no_node_can_hold_is_refused_naming_the_key():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 2.0}}]
    check_fits({"actors.num_cpus/num_gpus": {"CPU": 4, "GPU": 2}}, nodes)  # the first node holds it
    with pytest.raises(ClusterError, match=r"'actors.num_cpus/num_gpus'.*'GPU': 2.0"):
        check_fits({"actors.num_cpus/num_gpus": {"CPU": 1, "GPU": 4}}, nodes)  # only the dead node had 4 GPUs
    cfg = load_config(overrides={"learner.num_ranks": 4, "learner.groups_per_step": 16, "learner.num_cpus": 3,
                                 "learner.placement_strategy": "STRICT_PACK"})
    with pytest.raises(ClusterError, match="learner.placement_strategy"):  # 12 CPUs on one node: none has them
        check_fits(resource_requests(cfg), nodes)
    check_fits(resource_requests(cfg.model_copy(update={"learner": cfg.learner.model_copy(
        update={"placement_strategy": "PACK"})})), nodes)  # PACK may spread the ranks over nodes


def test_main_refuses_a_rollout_actor_no_node_can_hold(tmp_path, tiny_model_dir, capsys):
    rc = main(["--actors.num_gpus", "1", "--ray.num_cpus", "2", "--model.path", tiny_model_dir,
               "--output_dir", str(tmp_path), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "'actors.num_cpus/num_gpus/resources'" in err and "no node of the cluster has that much" in err, err
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # nothing ran
