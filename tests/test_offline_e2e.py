"""A purely offline run end to end (data.offline_fraction 1.0): no rollout actor, hence no vLLM engine, is
started; the learner trains on a synthesised offline file through the whole system (Ray, buffer, DeepSpeed)."""
from __future__ import annotations

import json
import math

import pytest

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow


def test_purely_offline_run_trains_without_rollout_actors(tmp_path, tiny_model_dir):
    from launch.train import run

    rows = []
    for a in range(3):
        for b in range(3):  # one group per prompt: the right answer and a wrong one, rewards 1 and 0
            rows += [{"prompt": f"{a}+{b}=", "response": str(a + b), "reward": 1.0},
                     {"prompt": f"{a}+{b}=", "response": str((a + b + 1) % 10), "reward": 0.0}]
    rows.append({"prompt": "1+1=", "response": "2"})  # no reward: skipped and counted
    data = tmp_path / "expert.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_dir = tmp_path / "run"
    cfg = load_config(None, parse_overrides([
        "--model.path", tiny_model_dir, "--data.max_operand", "4", "--output_dir", str(tmp_path),
        "--progress", "false", "--tensorboard", "false", "--ray.num_cpus", "2", "--learner.num_cpus", "1",
        "--learner.groups_per_step", "2", "--actors.prompts_per_request", "2", "--learner.micro_batch_groups", "2",
        "--learner.checkpoint_every", "0", "--learner.total_steps", "3", "--learner.objective.name", "agro",
        "--learner.objective.beta", "0.05", "--data.offline_fraction", "1.0",
        "--data.offline", json.dumps([{"path": str(data), "behaviour": "none", "source": "expert"}])]))
    summary = run(cfg, run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "reward_mean" in m]
    assert summary["steps"] == 3 and len(metrics) == 3
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl_to_ref"]) for m in metrics)
    assert all(m["rollout_actors"] == 0 and m["reward_mean"] == 0.5 for m in metrics)  # every group: one right, one wrong
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"].startswith("actor_")]  # no rollout actor was ever added
    data_event = next(e for e in events if e["event"] == "data")
    assert data_event["offline"]["expert"] == {"groups": 9, "rows": 18, "skipped": {"missing_reward": 1}}
    assert json.loads((run_dir / "actors.json").read_text())["actors"] == []
    ledger = summary["ledger"]
    assert ledger["groups_dispatched"] == 0 and ledger["offline_groups_trained"] >= 2 and ledger["groups_lost"] == 0
    assert summary["buffer"]["served_offline"] == 6 and summary["skipped"] == {"offline/missing_reward": 1}
    assert (run_dir / "final" / "config.json").exists()
