"""Held-out evaluation during a real run: greedy decoding on a rollout actor every k learner steps, logged as eval/..."""
from __future__ import annotations

import json

import pytest

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow

# Problems the learner never trains on (the tiny model's tokenizer covers operands 0..4).
HELD_OUT = {(1, 3), (2, 2), (4, 0), (3, 4), (0, 1)}


def _write_prompts(path, pairs) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), "id": f"add-{a}+{b}"}) + "\n"
                            for a, b in sorted(pairs)))
    return str(path)


def test_eval_every_k_steps_logs_greedy_held_out_reward(tmp_path, tiny_model_dir):
    from launch.train import run

    train = _write_prompts(tmp_path / "train.jsonl", {(a, b) for a in range(5) for b in range(5)} - HELD_OUT)
    held_out = _write_prompts(tmp_path / "eval.jsonl", HELD_OUT)
    cfg = load_config(None, parse_overrides([
        "--model.path", tiny_model_dir, "--output_dir", str(tmp_path), "--progress", "false", "--tensorboard", "false",
        "--ray.num_cpus", "3", "--actors.num_cpus", "1", "--learner.num_cpus", "1",
        "--data.train", train, "--data.eval", held_out, "--data.eval_every", "2", "--learner.total_steps", "6",
        "--actors.prompts_per_request", "8", "--learner.groups_per_step", "8", "--learner.micro_batch_groups", "8"]))
    run(cfg, tmp_path / "run")

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert [r["step"] for r in evals] == [2, 4, 6], evals
    for r in evals:
        # 5 prompts, greedy: the mean of 0/1 rewards is a multiple of 1/5
        assert 0.0 <= r["eval/reward_mean"] <= 1.0 and round(r["eval/reward_mean"] * 5, 6).is_integer(), r
        assert r["eval/response_length_mean"] > 0
        assert "reward_mean" not in r  # eval lines never pass for training lines
    versions = [r["eval/policy_version"] for r in evals]
    assert versions == sorted(set(versions)) and versions[0] >= 1, versions  # each evaluation saw newer weights
    assert all(v <= r["step"] for v, r in zip(versions, evals))
