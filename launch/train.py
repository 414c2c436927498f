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

from actors.config import resolved_dtype, resolved_eager
from launch.cluster import ClusterError, check_fits, join
from launch.config import ConfigError, RunConfig, check_model, load_config, parse_overrides


def placement(cfg: RunConfig) -> list[dict]:
    """Which actors the run starts and what each reserves."""
    rows = [{"actor": "replay_buffer", "count": 1, "num_cpus": 0, "num_gpus": 0}]
    A, L = cfg.actors, cfg.learner
    actors = 0 if cfg.data.offline_fraction == 1.0 else A.num_actors  # a purely offline run starts none
    rows.append({"actor": "rollout", "count": actors, "num_cpus": A.num_cpus,
                 # a tensor-parallel actor reserves a placement group of one whole GPU per worker, on one node
                 "num_gpus": gpus_per_actor(cfg), "resources": A.resources})
    rows.append({"actor": "learner_rank", "count": L.num_ranks, "num_cpus": L.num_cpus, "num_gpus": L.num_gpus, "resources": L.resources})
    if cfg.rewards.models:  # the service itself reserves nothing; each judge what its model asks for
        rows.append({"actor": "judge_service", "count": 1, "num_cpus": 0, "num_gpus": 0})
    rows += [{"actor": f"judge:{name}", "count": m.num_actors, "num_cpus": m.num_cpus, "num_gpus": m.num_gpus,
              "resources": m.resources} for name, m in cfg.rewards.models.items()]
    return rows


def gpus_per_actor(cfg: RunConfig) -> float:
    A = cfg.actors
    return A.tensor_parallel_size if A.tensor_parallel_size > 1 else A.num_gpus


def resource_requests(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """What one node must hold for each kind of actor, by the config key that asks for it."""
    A, L = cfg.actors, cfg.learner
    gpus = "tensor_parallel_size" if A.tensor_parallel_size > 1 else "num_gpus"
    out = {f"actors.num_cpus/{gpus}/resources": {"CPU": A.num_cpus, "GPU": gpus_per_actor(cfg), **A.resources},
           "learner.num_cpus/num_gpus/resources": {"CPU": L.num_cpus, "GPU": L.num_gpus, **L.resources}}
    for name, m in cfg.rewards.models.items():
        out[f"rewards.models.{name}.num_cpus/num_gpus/resources"] = {"CPU": m.num_cpus, "GPU": m.num_gpus, **m.resources}
    if cfg.data.offline_fraction == 1.0:  # no rollout actor starts
        del out[f"actors.num_cpus/{gpus}/resources"]
    if L.placement_strategy == "STRICT_PACK":  # every rank on one node
        out["learner.placement_strategy"] = {r: v * L.num_ranks for r, v in out["learner.num_cpus/num_gpus/resources"].items()}
    return out


def engine_settings(cfg: RunConfig) -> dict:
    """What each rollout actor's vLLM engine is started with, auto values resolved (actors/config.py)."""
    A = cfg.actors
    return {"dtype": resolved_dtype(A), "enforce_eager": resolved_eager(A), "tensor_parallel_size": A.tensor_parallel_size,
            "gpus_per_actor": gpus_per_actor(cfg),
            "max_model_len": cfg.model.max_model_len, "max_tokens": A.max_tokens,
            "gpu_memory_utilization": A.gpu_memory_utilization, "stop": A.stop, "stop_token_ids": A.stop_token_ids}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/ (default: the embedded default job)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and placement, then exit")
    parser.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from its latest checkpoint, with its config.yaml (overrides still apply)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA runs: also write the merged full model to final/ (learner.lora.merge_final); "
                             "the adapter, in PEFT format, is written to final/adapter/ either way")
    args, rest = parser.parse_known_args(argv)
    if args.resume:
        if args.config or args.run_dir:
            raise ConfigError("--resume takes the run's own config.yaml and directory: drop --config/--run-dir")
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory ({config} missing)")
        args.config, args.run_dir = str(config), args.resume
    cfg = load_config(args.config, parse_overrides(rest))
    if args.merge:
        if cfg.learner.lora is None:
            raise ConfigError("--merge merges a LoRA adapter into the base model, but learner.lora is not set")
        cfg.learner = cfg.learner.model_copy(update={"lora": cfg.learner.lora.model_copy(update={"merge_final": True})})
    return args, cfg


def init_ray(cfg: RunConfig) -> bool:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start a local one. Returns True if we started it."""
    import ray

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address, cfg.ray.connect_timeout_s)
        return False
    # address="local": a new local Ray, never a stray `ray start` cluster on this host (joining one is ray.address)
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
             runtime_env=env, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump({"config": cfg.model_dump(mode="json"), "placement": placement(cfg),
                              "engine": engine_settings(cfg)}, sort_keys=False))
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
    except (ConfigError, ClusterError, DataError) as exc:  # what only the built model, the data or the live cluster can tell, before any actor starts
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    print("relay: done " + json.dumps(summary))
    return 0


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    import ray

    from actors.rewards import Rewards
    from common.seeding import seed_everything
    from launch.data import prompt_format
    from launch.run_data import prepare_prompts
    from launch.loop import Launcher
    from launch.model import build_default_model
    from launch.judge_build import build_missing_judges

    seed_everything(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    model_path = cfg.model.path or build_default_model(cfg.model, cfg.data.max_operand, Path(cfg.output_dir) / "_models",
                                                       prompt_format(cfg.data))
    check_model(cfg, model_path)  # the built tiny model only now; a user model again, for a config built in code
    # judges without a path: built here, after config.yaml (which keeps null: a resume builds or reuses the same one)
    cfg.rewards, problem = build_missing_judges(cfg, Path(cfg.output_dir) / "_models")
    if problem:
        raise ConfigError(problem)
    data = prepare_prompts(cfg, model_path, Rewards(cfg.actors.reward))  # bad data fails here, before Ray starts
    if not data.sources:
        print(f"relay: data.train {cfg.data.train}: {len(data.train.prompts)} prompts"
              + (f", skipped {data.train.skipped}" if data.train.skipped else "")
              + (f"; data.eval {cfg.data.eval}: {len(data.eval)} prompts" if cfg.data.eval else ""), file=sys.stderr)
    for s in data.sources:
        print(f"relay: data.sources {s.name} (weight {s.weight:g}): {len(s.train.prompts)} prompts"
              + (f", skipped {s.train.skipped}" if s.train.skipped else "")
              + (f"; eval: {len(s.eval)} prompts" if s.eval else ""), file=sys.stderr)
    for o in data.offline:
        print(f"relay: data.offline {o.name}: {o.table.num_rows} rows in {o.groups} groups"
              + (f", skipped {o.skipped}" if o.skipped else ""), file=sys.stderr)
    started = init_ray(cfg)
    try:
        check_fits(resource_requests(cfg), ray.nodes())
        summary = Launcher(cfg, run_dir, model_path, resume=resume, data=data).run()
    finally:
        if started:
            ray.shutdown()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
