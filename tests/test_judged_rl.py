"""The seeds' setups in miniature learn against tiny judges (real vLLM, Ray, DeepSpeed on CPU): each shipped config
runs as shipped (its judges' paths unset, so the launcher's hook resolves them -- here to the session's judges,
found in the cache it looks in), on the session's tiny policy (the configs' own 30-step warm start at max_operand
4), shortened where a test has to stay near 90 s.

Learning is measured against the truth as well as the judge: the rollout log's responses scored by the exact
`arithmetic` rule, first fifth of the policy versions against the last. Margins: the starting policy samples a
right answer ~0.35 of the time, and a fifth of a run holds ~500-1,000 samples (std of its mean <= 0.02), so a
policy that does not learn stays within ~0.05 of where it started, and a rise of 0.1 fails without learning."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from examples.judged_eval import first_last, train_rewards, true_accuracy, win_rate
from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, tiny_model_dir, tiny_judges, config: str, *overrides: str) -> Path:
    """launch.train on configs/<config> with the session's policy; its judges come from the hook."""
    from launch.train import run

    out = tmp_path / "out"
    out.mkdir()
    (out / "_models").symlink_to(Path(tiny_judges["scalar"]).parent)  # the hook's cache: the session's judges
    cfg = load_config(str(ROOT / "configs" / config), parse_overrides(
        ["--model.path", tiny_model_dir, "--output_dir", str(out), "--ray.num_cpus", "3", *overrides]))
    assert all(m.path is None for m in cfg.rewards.models.values())  # the hook builds them
    summary = run(cfg, tmp_path / "run")
    ledger = summary["ledger"]
    assert ledger["groups_lost"] == 0 and ledger["groups_trained_too_often"] == 0, ledger
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert all(m["path"] is None for m in recorded["rewards"]["models"].values())  # resume resolves it again
    return tmp_path / "run"


def test_semi_online_dpo_with_a_reward_model_learns(tmp_path, tiny_model_dir, tiny_judges):
    run_dir = _run(tmp_path, tiny_model_dir, tiny_judges, "semi_online_dpo_rm.yaml")
    reward = first_last(train_rewards(run_dir))
    accuracy = true_accuracy(run_dir)
    assert reward[1] > reward[0] + 1.0, reward  # the judge's logit: right sums ~ +4, wrong ones ~ -4
    assert accuracy[1] > accuracy[0] + 0.1, accuracy


def test_online_ipo_with_a_preference_model_learns(tmp_path, tiny_model_dir, tiny_judges):
    """A preference reward is a win rate inside the group (every group's mean is 1/2), so it cannot rise: the
    final policy's samples are compared with the starting policy's under the same preference judge."""
    run_dir = _run(tmp_path, tiny_model_dir, tiny_judges, "online_ipo_pm.yaml")
    assert all(r == pytest.approx(0.5, abs=1e-6) for r in train_rewards(run_dir))
    accuracy = true_accuracy(run_dir)
    assert accuracy[1] > accuracy[0] + 0.1, accuracy
    wins = win_rate(tiny_judges["preference"], str(run_dir / "final"), tiny_model_dir, max_operand=4)
    assert wins > 0.55, wins


def test_a_verifiable_and_reward_model_mixture_learns_on_both_sources(tmp_path, tiny_model_dir, tiny_judges):
    run_dir = _run(tmp_path, tiny_model_dir, tiny_judges, "mixture_rm.yaml")
    judged = first_last(train_rewards(run_dir, "reward_mean/judged"))
    verified = first_last(train_rewards(run_dir, "reward_mean/verified"))
    assert judged[1] > judged[0] + 1.0, judged
    assert verified[1] > verified[0] + 0.1, verified  # the rule's reward is the true accuracy of its source
    accuracy = true_accuracy(run_dir, source="judged")
    assert accuracy[1] > accuracy[0] + 0.1, accuracy
