"""The GSM8K recipe's shape end to end on CPU (configs/gsm8k_tiny_chat.yaml) through launch.train's entry: a
messages JSONL, the tiny model's chat template with a system prompt, math_verify on \\boxed{} answers,
128-token responses, a few learner steps. The prompt ids stored in the rollouts are the chat template's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Solve the problem step by step, then give the final answer in \\boxed{}."


def _rows() -> list[dict]:
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"Ana has {i} pens and buys {i + 3} more. How many?"}],
             "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}", "data_source": "gsm8k_tiny"} for i in range(12)]
    return rows + [{"id": "bad", "messages": [{"role": "user"}], "answer": "1"}]  # malformed: counted, skipped


def _stored_rollouts(run_dir: Path) -> list:
    """Every rollout the buffer held at the run's checkpoints (Arrow IPC, as the buffer writes them)."""
    from buffer.persist import read_snapshot
    from buffer.schema import rollouts_from_arrow

    out = []
    for buffer_dir in sorted((run_dir / "checkpoints").glob("step-*/buffer")):
        snap = read_snapshot(str(buffer_dir))
        for batch in snap.groups + snap.pending:
            out += rollouts_from_arrow(batch)
    return out


def test_gsm8k_shaped_chat_run(tmp_path):
    from transformers import AutoTokenizer

    from launch.train import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    run_dir = tmp_path / "run"
    rc = main(["--config", str(ROOT / "configs/gsm8k_tiny_chat.yaml"), "--run-dir", str(run_dir),
               "--data.train", str(data), "--output_dir", str(tmp_path), "--progress", "false",
               "--tensorboard", "false", "--ray.num_cpus", "3", "--actors.num_cpus", "1", "--learner.num_cpus", "1",
               "--buffer.max_staleness", "2", "--buffer.max_reuse", "4"])  # groups outlive a sample: checkpoints hold some
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped"].get("bad_messages") == 1
    assert not summary["reward_faults"]  # math_verify ran (off the actor's main thread too) without failing

    by_id = {r["id"]: r for r in _rows()}
    model_dir = next((tmp_path / "_models").glob("tiny-qwen2-*"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rollouts = _stored_rollouts(run_dir)
    assert rollouts, "the checkpoints hold no rollouts"
    for r in rollouts:
        chat = [{"role": "system", "content": SYSTEM}, *by_id[r.prompt_id]["messages"]]
        assert r.token_ids[:r.prompt_len] == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert r.data_source == "gsm8k_tiny"
    # an untrained model rarely samples <|im_end|>: responses run to the 128-token cap
    assert max(len(r.response_ids) for r in rollouts) == 128

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["step"] for s in samples} <= {1, 2, 3, 4}
    for s in samples:
        assert {"step", "prompt", "response", "reward", "answer", "source", "policy_version"} <= set(s)
        assert s["prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nAna has ")
        assert s["prompt"].endswith("<|im_start|>assistant\n") and s["answer"].split("#### ")[1].isdigit()
        assert s["source"] == "gsm8k_tiny"
