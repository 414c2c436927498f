"""Joining a Ray cluster, and checking before any actor starts that it can hold the run.

A wrong address makes `ray.init` retry for minutes; a cluster with token authentication that this process has
no token for fails with Ray's own message, which does not say where the token comes from. Both become one error
naming the address and the fix. A request no node can hold (a rollout actor's GPUs, a learner rank's CPUs, a
custom resource) would otherwise wait for a node that never comes: it is refused here, naming the config key.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

AUTH_FIX = ("Ray clusters started by Ray 2.60 use token authentication by default. Run every `ray` command and "
            "Relay with RAY_AUTH_MODE=token, and give this machine the cluster's token: copy the head node's "
            "~/.ray/auth_token (print it there with `ray get-auth-token`) to ~/.ray/auth_token here, or set "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or RAY_AUTH_TOKEN to the token itself.")


class ClusterError(RuntimeError):
    """The cluster cannot be joined, or cannot hold what the run asks for; raised before any actor starts."""


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` GCS address; None for addresses Ray resolves itself ('auto', 'local',
    ray:// client addresses)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"ray.address / RAY_ADDRESS {address!r} is the dashboard's job-submission address: "
                           "submit with `ray job submit` (it sets the driver's address itself), or give the head's "
                           "GCS address host:port (port 6379 by default) to run the launcher directly")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"ray.address / RAY_ADDRESS {address!r}: expected host:port (e.g. 10.0.0.1:6379) or 'auto'")
    return host, int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connection to the GCS within `timeout_s`, so that a wrong address fails now and says so."""
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} within {timeout_s:.0f} s ({exc}): is the head "
                           "node up (`ray start --head` prints its address), and is its GCS port open from here?") from None


def join(address: str, timeout_s: float) -> None:
    """ray.init(address) with the two failures a user can fix turned into errors that say how."""
    import ray
    from ray.exceptions import AuthenticationError

    check_reachable(address, timeout_s)
    try:
        ray.init(address=address, log_to_driver=True)
    except AuthenticationError as exc:
        raise ClusterError(f"the Ray cluster at {address} refused this process: {_auth_state()}. {AUTH_FIX}"
                           f" (Ray said: {str(exc)[:300]})") from None


def _auth_state() -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    has_token = (bool(os.environ.get("RAY_AUTH_TOKEN")) or bool(token_path and Path(token_path).is_file())
                 or (Path.home() / ".ray" / "auth_token").is_file())
    return f"RAY_AUTH_MODE is {mode!r} and {'a' if has_token else 'no'} token is available here"


def check_fits(requests: dict[str, dict[str, float]], nodes: list[dict]) -> None:
    """Every request (config key -> resources one actor or rank needs) fits on at least one alive node."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    for key, need in requests.items():
        need = {r: v for r, v in need.items() if v > 0}
        if any(all(res.get(r, 0.0) >= v for r, v in need.items()) for res in alive):
            continue
        largest = {r: max((res.get(r, 0.0) for res in alive), default=0.0) for r in need}
        raise ClusterError(f"config key {key!r}: each one needs {need}, but no node of the cluster has that much "
                           f"(the most any node has: {largest}); lower the request or add a node that can hold it")
