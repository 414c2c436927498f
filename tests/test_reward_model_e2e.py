"""Learned judges in the whole system (real vLLM, Ray, DeepSpeed on CPU): a generator hands model-judged groups on
unscored and scores rule-routed ones inline; `launch.train` with `actors.reward: model:rm` trains on the judge's
rewards, evaluates with them, and its ledger stays exact."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from actors.judge import Judge
from actors.reward_config import RewardModelConfig
from tests.tiny_judge import build_judge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> str:
    return build_judge(tmp_path_factory.mktemp("judge") / "rm")


def test_generator_defers_judged_groups_and_scores_rule_routes_inline(tiny_model_dir, judge_dir):
    from actors.config import ActorConfig
    from actors.generator import Generator, Prompt
    from buffer.schema import rollouts_from_arrow

    cfg = ActorConfig(n=3, max_tokens=4, reward={"judged": "model:rm", "default": "arithmetic"})
    gen = Generator(cfg, tiny_model_dir, "gen-0", max_model_len=64)
    gen.defer_judges = True
    prompts = [Prompt("a", "1+1=", "2", data_source="judged"), Prompt("b", "2+2=", "4"),
               Prompt("c", "1+3=", "4", data_source="judged")]
    try:
        result = gen.generate(prompts)
    finally:
        gen.close()
    rows = rollouts_from_arrow(result.batch)
    [work] = result.judge_work
    assert work.model == "rm" and work.rows == [[0, 1, 2], [6, 7, 8]]  # groups a and c, where the batch holds them
    assert [rs for _, rs in work.groups] == [[r.response_text for r in rows[0:3]], [r.response_text for r in rows[6:9]]]
    assert work.groups[0][0] == [{"role": "user", "content": "1+1="}]
    assert [r.data_source for r in rows] == ["judged"] * 3 + [""] * 3 + ["judged"] * 3
    for r in rows[3:6]:  # the rule scored inline
        assert r.reward == float("".join(r.response_text.split()) == "4")
    # what the service will score equals what a Judge gives the same groups
    judge = Judge(RewardModelConfig(), "rm", judge_dir)
    assert len(judge.score_groups(work.groups)) == 2


def _train(tmp_path, tiny_model_dir, *overrides):
    from launch.config import load_config, parse_overrides
    from launch.train import run

    cfg = load_config(None, parse_overrides([
        "--model.path", tiny_model_dir, "--data.max_operand", "4", "--output_dir", str(tmp_path),
        "--progress", "false", "--tensorboard", "false", "--ray.num_cpus", "3", "--actors.num_cpus", "0.5",
        "--learner.num_cpus", "1", "--actors.prompts_per_request", "4", "--learner.groups_per_step", "4",
        "--learner.micro_batch_groups", "4", "--actors.n", "4", "--learner.track_ref_kl", "false",
        "--buffer.max_staleness", "1", "--learner.checkpoint_every", "0", *overrides]))
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward_mean" in r]
    assert max(r["staleness_max"] for r in train) <= 1  # scoring off the generation path keeps the bound
    ledger = summary["ledger"]
    assert ledger["groups_lost"] == 0 and ledger["groups_trained_too_often"] == 0, ledger
    assert ledger["requests_recorded"] == ledger["requests_dispatched"], ledger
    return summary, rows, train


def _kill_judge_at_step(run_dir, step: int, killed: list) -> threading.Thread:
    """SIGKILL the judge judges.json names once metrics.jsonl has `step` lines (a fault from outside the run)."""
    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            metrics, pools = run_dir / "metrics.jsonl", run_dir / "judges.json"
            if metrics.exists() and sum(1 for _ in metrics.open()) >= step and pools.exists():
                pid = json.loads(pools.read_text())["pools"]["rm"][0]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_train_with_a_reward_model_keeps_the_ledger_exact(tmp_path, tiny_model_dir, judge_dir):
    """A judge SIGKILLed at step 2 is replaced and its chunk re-scored: the run finishes with every group counted."""
    steps, killed = 8, []
    _kill_judge_at_step(tmp_path / "run", 2, killed)
    summary, rows, train = _train(tmp_path, tiny_model_dir, "--learner.total_steps", str(steps),
                                  "--data.eval", "synthetic:arithmetic", "--data.eval_every", "3",
                                  "--actors.reward", "model:rm",
                                  "--rewards.models", f"{{rm: {{path: {judge_dir}, num_cpus: 0.5}}}}")
    ledger = summary["ledger"]
    assert summary["steps"] == steps
    judges = summary["judges"]
    assert judges["rows_judged"] >= ledger["groups_trained"] * 4, judges
    assert judges["requests_scored"] == ledger["requests_recorded"], judges  # every request through the service
    assert killed, "the judge was never killed"
    rm = judges["models"]["rm"]
    assert rm["actor_failures"] == 1 and rm["rows_rescored"] > 0 and rm["actors"] == 1, judges
    events = (tmp_path / "run" / "judge_events.jsonl").read_text()
    assert '"judge_failed", "actor": "rm-0"' in events and '"judge_restarted", "actor": "rm-0.r1"' in events
    # the random judge's scores, not the arithmetic rule's 0/1 and not the placeholder 0
    assert all(r["reward_mean"] != 0.0 for r in train), [r["reward_mean"] for r in train]
    assert any(r["reward_mean"] not in (0.0, 1.0) for r in train)
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert evals and all(r["eval/reward_mean"] != 0.0 for r in evals)  # evaluation scored through the service
    assert (tmp_path / "run" / "judges.json").exists()


def test_online_ipo_with_a_preference_model(tmp_path, tiny_model_dir, judge_dir):
    """kind: preference: every group's rewards are win rates (mean 0.5 exactly, Borda), ipo trains on best vs worst."""
    summary, _, train = _train(tmp_path, tiny_model_dir, "--learner.total_steps", "4",
                               "--learner.objective.name", "ipo", "--actors.reward", "model:pm",
                               "--rewards.models", f"{{pm: {{kind: preference, path: {judge_dir}, num_cpus: 0.5}}}}")
    assert summary["steps"] == 4 and summary["judges"]["rows_judged"] > 0
    assert all(r["reward_mean"] == pytest.approx(0.5, abs=1e-6) for r in train), [r["reward_mean"] for r in train]
    assert all(r["loss"] != 0.0 for r in train)


def test_a_rule_and_a_reward_model_mixture(tmp_path, tiny_model_dir, judge_dir):
    """data.sources naming a rule and a judge: rule rows scored inline, judged rows by the service, one ledger."""
    summary, _, train = _train(tmp_path, tiny_model_dir, "--learner.total_steps", "4",
                               "--rewards.models", f"{{rm: {{path: {judge_dir}, num_cpus: 0.5}}}}", "--data.sources",
                               "[{name: math, train: 'synthetic:arithmetic', reward: arithmetic}, "
                               "{name: open, train: 'synthetic:arithmetic', reward: 'model:rm'}]")
    assert summary["steps"] == 4
    judged, dispatched = summary["judges"]["rows_judged"], summary["ledger"]["groups_dispatched"] * 4
    assert 0 < judged < dispatched, (judged, dispatched)  # some rows judged, the rule's rows not
    assert all(summary["sources"][s]["groups_dispatched"] > 0 for s in ("math", "open")), summary["sources"]
