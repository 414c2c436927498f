"""LoRA with adapter-only sync through the whole system on CPU (`launch.train`: local Ray, a vLLM rollout actor
serving the adapter, the buffer, a DeepSpeed learner), then resumed from its checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow

ARGS = ("--data.max_operand", "4", "--progress", "false", "--ray.num_cpus", "3", "--actors.num_cpus", "1",
        "--learner.num_cpus", "1", "--buffer.max_staleness", "0", "--actors.prompts_per_request", "8",
        "--learner.groups_per_step", "8", "--learner.micro_batch_groups", "8", "--learner.lr", "2e-2",
        "--learner.lora", "{rank: 8, alpha: 16}", "--learner.lora.merge_final", "true",
        "--learner.checkpoint_every", "3", "--tensorboard", "false")


def _rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


def _assert_served_exactly_what_was_published(rows: list[dict], steps: range) -> None:
    """Synchronous (staleness 0): each step trains on the previous step's version, every token of which the learner
    scores with the very weights that sampled it; base + adapter in vLLM and the learner's PEFT model agree."""
    assert [r["step"] for r in rows] == list(steps)
    assert [r["behaviour_version_max"] for r in rows] == [s - 1 for s in steps]  # versions advance, one per step
    assert all(r["mismatch_tokens"] == r["tokens"] > 0 for r in rows), [(r["mismatch_tokens"], r["tokens"]) for r in rows]
    assert max(r["mismatch_abs_mean"] for r in rows) < 1e-4, [r["mismatch_abs_mean"] for r in rows]


def test_lora_adapter_sync_run_and_resume(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launch.train import run

    run_dir = tmp_path / "run"
    base = ["--model.path", tiny_model_dir, "--output_dir", str(tmp_path), *ARGS]
    cfg = load_config(None, parse_overrides([*base, "--learner.total_steps", "4"]))
    assert cfg.learner.lora.sync == "adapter"  # auto, with the object store between batches
    summary = run(cfg, run_dir)
    _assert_served_exactly_what_was_published(_rows(run_dir), range(1, 5))
    ledger = summary["ledger"]
    assert ledger["groups_lost"] == 0 and ledger["groups_trained_too_often"] == 0 and ledger["groups_trained"] == 32
    assert "mismatch_warning" not in (run_dir / "events.jsonl").read_text()

    ckpt = run_dir / "checkpoints" / "step-00000003" / "model"  # what a resumed run's generators load: the adapter
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    final = run_dir / "final"  # merge_final: the merged model next to the PEFT adapter
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(plain, final / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            c = adapted(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert float((a - c).abs().max()) > 1e-3  # the adapter trained, so serving the base alone would have shown

    # resumed from step 3: the new generator serves the base model plus the checkpoint's adapter as version 3
    cfg = load_config(None, parse_overrides([*base, "--learner.total_steps", "6"]))
    summary = run(cfg, run_dir, resume=True)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    _assert_served_exactly_what_was_published(_rows(run_dir)[3:], range(4, 7))
    assert summary["ledger"]["groups_lost"] == 0 and summary["ledger"]["groups_trained_too_often"] == 0
