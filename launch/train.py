"""`python -m launch.train [--config FILE] [--dry-run] [--a.b value ...]`: one entry point, local or on a cluster.

With no arguments it runs the embedded default job: a tiny Qwen2 model built
here, warm-started on the answer format, then trained by RL on synthetic
arithmetic. Under `ray job submit ... -- python -m launch.train ...` the same
code joins the job's cluster instead of starting a local one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from launch.config import ConfigError, RunConfig, load_config, parse_overrides


def placement(cfg: RunConfig) -> list[dict]:
    """Which actors the run starts and what each reserves."""
    rows = [{"actor": "replay_buffer", "count": 1, "num_cpus": 0, "num_gpus": 0}]
    rows.append({"actor": "rollout", "count": cfg.actors.num_actors, "num_cpus": cfg.actors.num_cpus, "num_gpus": cfg.actors.num_gpus})
    rows.append({"actor": "learner_rank", "count": cfg.learner.num_ranks, "num_cpus": cfg.learner.num_cpus, "num_gpus": cfg.learner.num_gpus})
    return rows


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/ (default: the embedded default job)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and placement, then exit")
    parser.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from its latest checkpoint, with its config.yaml (overrides still apply)")
    args, rest = parser.parse_known_args(argv)
    if args.resume:
        if args.config or args.run_dir:
            raise ConfigError("--resume takes the run's own config.yaml and directory: drop --config/--run-dir")
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory ({config} missing)")
        args.config, args.run_dir = str(config), args.resume
    cfg = load_config(args.config, parse_overrides(rest))
    return args, cfg


def init_ray(cfg: RunConfig) -> bool:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start a local one. Returns True if we started it."""
    import ray

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
             runtime_env=env, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump({"config": cfg.model_dump(mode="json"), "placement": placement(cfg)}, sort_keys=False))
        return 0
    run_dir = Path(args.run_dir or Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        from launch import checkpoint

        try:
            checkpoint.latest(run_dir)  # before any actor starts
        except FileNotFoundError as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 2
    from launch.data import DataError

    try:
        summary = run(cfg, run_dir, resume=bool(args.resume))
    except DataError as exc:  # raised before any actor started: a message, not a traceback
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    print("relay: done " + json.dumps(summary))
    return 0


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    import ray

    from actors.rewards import Rewards
    from common.seeding import seed_everything
    from launch.data import prepare_prompts, prompt_format
    from launch.loop import Launcher
    from launch.model import build_default_model

    seed_everything(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    model_path = cfg.model.path or build_default_model(cfg.model, cfg.data.max_operand, Path(cfg.output_dir) / "_models",
                                                       prompt_format(cfg.data))
    data = prepare_prompts(cfg, model_path, Rewards(cfg.actors.reward))  # bad data fails here, before Ray starts
    print(f"relay: data.train {cfg.data.train}: {len(data.train.prompts)} prompts"
          + (f", skipped {data.train.skipped}" if data.train.skipped else "")
          + (f"; data.eval {cfg.data.eval}: {len(data.eval)} prompts" if cfg.data.eval else ""), file=sys.stderr)
    started = init_ray(cfg)
    try:
        summary = Launcher(cfg, run_dir, model_path, resume=resume, data=data).run()
    finally:
        if started:
            ray.shutdown()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
