"""Learner ranks in a Ray placement group: placed together before any rank starts, or a clear error naming the bundles."""
from __future__ import annotations

import socket
import time

import pytest

from learner.config import LearnerConfig


@pytest.fixture(scope="module")
def ray2():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own, never a running one
    yield ray
    ray.shutdown()


def _wait_cpus(ray, expected: float, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (cpus := ray.available_resources().get("CPU", 0.0)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return cpus


def test_rendezvous_ports_are_never_ones_an_outgoing_connection_can_take():
    """The learner's rendezvous port lies below the kernel's ephemeral range (where every outgoing connection takes
    its source port, so a port picked there can be taken before rank 0 binds it) and above Ray's worker ports, and
    is free when picked."""
    from learner.actor import RENDEZVOUS_PORTS, _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(RENDEZVOUS_PORTS[0] <= p < min(RENDEZVOUS_PORTS[1] + 1, _ephemeral_low()) for p in ports), ports
    assert len(ports) > 1  # drawn, not one fixed port that every run on a host would race for
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))


@pytest.mark.slow
def test_two_ranks_are_placed_and_reserve_their_bundles(ray2):
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from learner.actor import place_learner_group, rendezvous_port

    cfg = LearnerConfig(num_ranks=2, num_cpus=0.5, placement_strategy="STRICT_PACK", placement_timeout_s=20)
    pg, addr = place_learner_group(cfg)
    table = placement_group_table(pg)
    assert table["state"] == "CREATED" and table["strategy"] == "STRICT_PACK"
    assert [b for _, b in sorted(table["bundles"].items())] == [{"CPU": 0.5}, {"CPU": 0.5}]
    # MASTER_ADDR is the IP of the node holding bundle 0 (here the only node)
    node = {n["NodeID"]: n["NodeManagerAddress"] for n in ray2.nodes()}[table["bundles_to_node_id"][0]]
    assert addr == node
    assert _wait_cpus(ray2, 1.0) == 1.0  # the group holds its CPUs whether or not ranks run yet
    # rank 0 on another node than the driver: the port is probed there, by a CPU-less task in bundle 0
    port = rendezvous_port(pg, "198.51.100.7", timeout_s=60)
    with socket.socket() as s:
        s.bind(("", port))  # free on the bundle's node (this one)
    assert ray2.available_resources().get("CPU") == 1.0  # the probe took nothing from the ranks' bundles
    remove_placement_group(pg)
    assert _wait_cpus(ray2, 2.0) == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("kw, missing", [({"num_gpus": 1.0}, "'GPU': 1.0"), ({"num_ranks": 3, "num_cpus": 1.0}, "3 bundle(s)")])
def test_impossible_placement_fails_fast_before_any_rank_starts(ray2, kw, missing):
    from learner.actor import make_learner_ranks

    cfg = LearnerConfig(placement_timeout_s=2.0, **kw)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="learner placement group") as err:
        make_learner_ranks(cfg, model_path="/unused", group_size=2, temperature=1.0, transport=None)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert missing in msg and "learner.placement_timeout_s=2.0" in msg and "available" in msg and "'CPU': 2.0" in msg
    from ray._private.state import actors

    assert not [a for a in actors().values() if a["State"] != "DEAD"]  # no rank was started
    assert _wait_cpus(ray2, 2.0) == 2.0  # the pending group was removed, not left to grab CPUs later
