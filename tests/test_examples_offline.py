"""The offline-evidence examples run end to end at a tiny size and write their table, scores and plot.

Fast tests check the pieces the tables rest on (the fixed point of E[r] - beta KL, the expert file's groups, the
reward and KL scoring of a saved policy); the slow ones run each example's own code path: real Ray, vLLM and
DeepSpeed, a few learner steps on the tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from examples.agro_offline import fixed_point
from examples.mixed_offline import write_expert

TINY = ["--data.max_operand", "4", "--ray.num_cpus", "2", "--learner.num_cpus", "1", "--learner.groups_per_step", "2",
        "--actors.prompts_per_request", "2", "--learner.micro_batch_groups", "2"]


def test_fixed_point_matches_the_closed_form(tmp_path):
    # two prompts: the reference is right on a quarter and on all of the samples
    rows = {"prompt_id": ["a"] * 4 + ["b"] * 2, "reward": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]}
    path = tmp_path / "ref.parquet"
    pq.write_table(pa.table(rows), path)
    reward, kl = fixed_point(path, beta=1.0)
    q = 0.25 * math.e / (0.25 * math.e + 0.75)  # pi*(right) on prompt a; prompt b stays at 1 with KL 0
    assert reward == pytest.approx((q + 1.0) / 2)
    assert kl == pytest.approx((q - math.log(0.25 * math.e + 0.75) + 0.0) / 2)
    assert fixed_point(path, beta=1e-3)[0] == pytest.approx(1.0)  # beta -> 0: always right where p > 0


def test_expert_groups_hold_one_right_answer_and_distinct_wrong_ones(tmp_path):
    rows = [json.loads(line) for line in write_expert(tmp_path / "e.jsonl", max_operand=4, group=8).read_text().splitlines()]
    assert len(rows) == 25 * 8
    for a in range(5):
        for b in range(5):
            group = [r for r in rows if r["group_id"] == f"expert-{a}+{b}"]
            assert {r["prompt"] for r in group} == {f"{a}+{b}="} and len({r["response"] for r in group}) == 8
            assert [r["response"] for r in group if r["reward"] == 1.0] == [str(a + b)]


def test_policy_scores_itself_at_zero_kl_and_a_changed_policy_above(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from examples.policy_eval import score
    from launch.config import load_config, parse_overrides

    cfg = load_config(None, parse_overrides(["--model.path", tiny_model_dir, "--data.max_operand", "4"]))
    same = score(Path(tiny_model_dir), Path(tiny_model_dir), cfg, n=2)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and 0.0 <= same.reward <= 1.0 and same.length >= 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # tied embeddings: a sharper, different policy
    model.save_pretrained(tmp_path / "changed")
    assert score(tmp_path / "changed", Path(tiny_model_dir), cfg, n=2).kl > 0.01


@pytest.mark.slow
def test_agro_offline_example_writes_table_scores_and_plot(tmp_path, tiny_model_dir, capsys):
    from examples import agro_offline

    out = tmp_path / "out"
    assert agro_offline.main(["--objectives", "agro", "--betas", "0.5", "--steps", "4", "--every", "2",
                              "--gen-steps", "3", "--samples", "1", "--out", str(out),
                              "--model.path", tiny_model_dir, *TINY]) == 0
    versions = pq.read_table(out / "ref.parquet", columns=["token_versions"]).column(0).to_pylist()
    assert versions and {v for row in versions for v in row} == {0}  # the reference's samples only
    scores = json.loads((out / "scores.json").read_text())
    assert [p["step"] for p in scores["agro|0.5"]] == [0, 2, 4]  # the reference, then every saved policy
    assert scores["agro|0.5"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    table = (out / "agro_offline.md").read_text()
    assert table.startswith("| objective | beta |") and "| agro | 0.5 |" in table
    assert (out / "agro_offline.png").stat().st_size > 0 and "| agro | 0.5 |" in capsys.readouterr().out


@pytest.mark.slow
def test_mixed_offline_example_writes_table_and_plot(tmp_path, tiny_model_dir):
    from examples import mixed_offline

    out = tmp_path / "out"
    assert mixed_offline.main(["--steps", "3", "--max-operand", "4", "--samples", "1", "--fraction", "0.5",
                               "--out", str(out), "--model.path", tiny_model_dir, *TINY]) == 0
    summary = json.loads((out / "mixed" / "summary.json").read_text())
    assert summary["ledger"]["offline_groups_trained"] >= 3  # one of the two groups of every step
    assert json.loads((out / "online" / "summary.json").read_text())["ledger"]["offline_groups_trained"] == 0
    rows = (out / "mixed_offline.md").read_text().splitlines()
    assert rows[0].startswith("| run |") and len(rows) == 4
    assert (out / "mixed_offline.png").stat().st_size > 0


def test_staleness_kl_scores_final_policies_and_redraws(tmp_path, tiny_model_dir):
    import shutil

    import yaml

    from examples import staleness_kl
    from launch.config import load_config, parse_overrides

    cfg = load_config(None, parse_overrides(["--model.path", tiny_model_dir, "--data.max_operand", "4"]))
    out = tmp_path / "staleness"
    for name in ("reinforce-s0", "agro-b0.1-s16"):  # two "runs" whose final policy is the reference itself
        shutil.copytree(tiny_model_dir, out / name / "final")
        (out / name / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert staleness_kl.main([str(out), "--samples", "1"]) == 0
    written = json.loads((out / "staleness_kl.json").read_text())
    assert set(written["runs"]) == {"reinforce|0", "agro:0.1|16"}
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-6) and r["checkpoints"] == [] for r in written["runs"].values())
    table = (out / "staleness_kl.md").read_text()
    assert "| agro:0.1 | 16 |" in table and "| reinforce | 0 |" in table
    (out / "staleness_kl.png").unlink()
    assert staleness_kl.main(["unused", "--out", str(out), "--redraw"]) == 0  # from the json, no sampling
    assert (out / "staleness_kl.png").stat().st_size > 0
