"""`python -m launch.scale --run <run dir> [--rollout-actors N] [--reward-actors NAME=N ...] [--stop]`: resize (or
stop) a running job's rollout fleet and its judge pools.

The running launcher watches `<run dir>/control.json` once a second. Scaling up
starts new rollout actors (each requests its own CPUs/GPUs, so a Ray autoscaler
can add nodes for them) that load the newest weights before they sample;
scaling down retires the highest-numbered actors, each finishing the request it
holds first, so no prompt is lost. Without `--rollout-actors` it prints the
fleet the launcher last reported (`actors.json`). `--reward-actors rm=3` resizes the pool of judge `rm` of
`rewards.models` (its service reports to `judges.json`): a retired judge finishes the chunk it holds. `--stop` ends the run cleanly: the step under
way finishes, a checkpoint is written, and `python -m launch.train --resume <run dir>` continues it. On a cluster, run it where the
run directory is (e.g. `ray job submit -- python -m launch.scale ...` on the head).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from launch.control import CONTROL
from transport.registry import pushes


def request(run_dir: Path, rollout_actors: int | None = None, stop: bool = False,
            reward_actors: dict[str, int] | None = None) -> Path:
    """Write the request atomically (the launcher never reads half a file); a stop keeps the fleet size asked last."""
    if rollout_actors is not None and rollout_actors < 1:
        raise ValueError(f"--rollout-actors must be >= 1, got {rollout_actors}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    models = sorted((config.get("rewards") or {}).get("models") or {})
    for name, n in (reward_actors or {}).items():
        if name not in models:
            raise ValueError(f"--reward-actors {name}={n}: {run_dir} has no judge {name!r} (rewards.models: {models})")
        if n < 1:
            raise ValueError(f"--reward-actors {name}={n}: a judge pool needs at least one actor")
    transport = config.get("weights", {}).get("transport")
    if rollout_actors is not None and transport is not None and pushes(transport):
        raise ValueError(f"{run_dir} pushes weights with weights.transport={transport}: its fleet is fixed at start")
    path = run_dir / CONTROL
    control = json.loads(path.read_text()) if path.is_file() else {}
    if rollout_actors is not None:
        control["rollout_actors"] = rollout_actors
    if reward_actors:
        control["reward_actors"] = {**control.get("reward_actors", {}), **reward_actors}
    control.update(stop=stop or control.get("stop", False), requested_at=time.time())
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(control))
    os.replace(tmp, path)
    return path


def _pairs(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, eq, n = item.partition("=")
        if not eq or not n.strip().lstrip("-").isdigit():
            raise ValueError(f"--reward-actors {item!r}: write NAME=N, e.g. rm=2")
        out[name] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory of a running job")
    parser.add_argument("--rollout-actors", type=int, help="the number of rollout actors to run from now on")
    parser.add_argument("--reward-actors", nargs="+", default=[], metavar="NAME=N",
                        help="judge pools to resize: the number of actors of rewards.models.NAME from now on")
    parser.add_argument("--stop", action="store_true",
                        help="finish the current step, write a checkpoint and exit (continue with launch.train --resume)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        judges = _pairs(args.reward_actors)
        if args.rollout_actors is not None or args.stop or judges:
            path = request(run_dir, args.rollout_actors, args.stop, judges)
            print(f"relay: asked {path} for " + ", ".join(
                ([f"{args.rollout_actors} rollout actors"] if args.rollout_actors is not None else []) +
                [f"{n} {name} judges" for name, n in judges.items()] +
                (["a stop after the current step"] if args.stop else [])))
    except (ValueError, FileNotFoundError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    fleet = run_dir / "actors.json"
    if fleet.is_file():
        print(fleet.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
