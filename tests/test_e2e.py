"""The whole system on CPU: local Ray, real vLLM rollout actors, the buffer actor, a DeepSpeed learner."""
from __future__ import annotations

import json

import pytest

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow


def _run(tmp_path, tiny_model_dir, *overrides: str):
    from launch.train import run

    cfg = load_config(None, parse_overrides([
        "--model.path", tiny_model_dir, "--data.max_operand", "4", "--output_dir", str(tmp_path),
        "--progress", "false", "--ray.num_cpus", "3", "--actors.num_cpus", "1", "--learner.num_cpus", "1",
        *overrides]))
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, [r for r in rows if "reward_mean" in r]


def test_async_run_learns_with_bounded_staleness(tmp_path, tiny_model_dir):
    steps = 200
    cfg, summary, rows = _run(tmp_path, tiny_model_dir, "--learner.total_steps", str(steps), "--learner.lr", "5e-4",
                              "--actors.num_actors", "2", "--actors.num_cpus", "0.5", "--buffer.max_staleness", "2",
                              "--actors.prompts_per_request", "8", "--learner.groups_per_step", "8",
                              "--learner.micro_batch_groups", "8")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # every required metric is present on every line
    from launch.metrics import REQUIRED

    assert all(set(REQUIRED) <= set(r) for r in rows)
    # versions advance, generators receive them, staleness never exceeds the bound
    assert [r["policy_version"] for r in rows][-1] == steps - 1  # the last step's weights are not published
    assert max(r["staleness_max"] for r in rows) <= 2
    assert max(r["behaviour_version_max"] for r in rows) >= steps - 4
    # the learnable task is learned
    quarter = steps // 4
    first = sum(r["reward_mean"] for r in rows[:quarter]) / quarter
    last = sum(r["reward_mean"] for r in rows[-quarter:]) / quarter
    assert last > first + 0.08, (first, last)
    # nothing is lost uncounted: every inserted group was trained on, dropped for a counted reason, or is still held
    b = summary["buffer"]
    assert b["inserts"] == b["samples"] + b["drops_stale_at_sample"] + b["drops_evicted_unsampled"] + b["size_groups"]
    assert b["samples"] == steps * 8
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    # the final checkpoint is Hugging Face format that transformers and vLLM both load
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and not list(final.glob("*.bin"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(final), dtype="float32", enforce_eager=True, max_model_len=64)
    out = llm.generate(["2+2="], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert out[0].outputs[0].token_ids


def test_sync_mode_has_zero_staleness(tmp_path, tiny_model_dir):
    _, summary, rows = _run(tmp_path, tiny_model_dir, "--learner.total_steps", "8", "--buffer.max_staleness", "0",
        "--actors.prompts_per_request", "8", "--learner.groups_per_step", "8", "--learner.micro_batch_groups", "4",
        "--learner.objective.name", "tis", "--weights.transport", "disk", "--learner.zero_stage", "2")
    assert len(rows) == 8
    assert all(r["staleness_max"] == 0 for r in rows)
    assert summary["buffer"]["drops_stale_at_sample"] == 0  # one actor: admission alone keeps every group fresh
    # every request after the first was admitted while the step before it trained (buffer.reserve, one step
    # ahead) and held until that step ended: fresh, yet no admission call between a step and the next generation
    assert summary["buffer"]["reserved_ahead"] == 8 * 7
    assert [r["behaviour_version_max"] for r in rows] == list(range(8))  # each step trains on the previous step's weights
    # every token was sampled by the weights the learner held: the generator served exactly what was published
    assert all(r["mismatch_tokens"] == r["tokens"] for r in rows), [(r["mismatch_tokens"], r["tokens"]) for r in rows]
    assert max(r["mismatch_abs_mean"] for r in rows) < 1e-4, [r["mismatch_abs_mean"] for r in rows]
    assert "mismatch_warning" not in (tmp_path / "run" / "events.jsonl").read_text()
