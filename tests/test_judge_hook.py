"""The tiny-judge hook (rewards.models.<name>.path unset): refused without arithmetic training data, built for the
right operand range, checked once built; and the sync period s = infinity (learner.publish_every: never)."""
from __future__ import annotations

import pytest

from launch.config import ConfigError, load_config, parse_overrides

RM = ["--actors.reward", "model:rm", "--rewards.models", "{rm: {}}"]


def test_an_unset_judge_path_needs_arithmetic_training_data(tmp_path):
    cfg = load_config(None, parse_overrides(RM))  # data.train synthetic:arithmetic: the tiny judge knows it
    assert cfg.rewards.models["rm"].path is None
    rows = tmp_path / "open.jsonl"
    rows.write_text('{"prompt": "Say hi", "answer": "hi"}\n')
    with pytest.raises(ConfigError, match=r"'rewards.models.rm.path': not set.*no training source is synthetic"):
        load_config(None, parse_overrides([*RM, "--data.train", str(rows)]))
    with pytest.raises(ConfigError, match=r"'rewards.models.pm.path': not set"):  # a mixture without arithmetic
        load_config(None, parse_overrides(["--rewards.models", "{pm: {kind: preference}}", "--data.sources",
                                           f"[{{name: open, train: {rows}, reward: 'model:pm'}}]"]))
    mixed = load_config(None, parse_overrides(["--rewards.models", "{rm: {}}", "--data.sources",
                                               f"[{{name: open, train: {rows}, reward: 'model:rm'}}, "
                                               "{name: math, train: 'synthetic:arithmetic', reward: arithmetic}]"]))
    assert mixed.rewards.models["rm"].path is None


def test_the_judge_is_built_for_the_operands_it_scores():
    from launch.judge_build import judge_max_operand

    plain = load_config(None, parse_overrides([*RM, "--data.max_operand", "6"]))
    assert judge_max_operand(plain.data, "rm") == 6
    mixed = load_config(None, parse_overrides(["--rewards.models", "{rm: {}}", "--data.max_operand", "9",
                                               "--data.sources", "[{name: math, train: 'synthetic:arithmetic', "
                                               "reward: arithmetic}, {name: judged, train: 'synthetic:arithmetic', "
                                               "reward: 'model:rm', max_operand: 4}]"]))
    assert judge_max_operand(mixed.data, "rm") == 4  # its own source's, not data.max_operand's 9
    assert judge_max_operand(mixed.data, "other") == 9  # scoring no source by name: every arithmetic source


def test_a_built_judge_is_checked_before_any_actor_starts(tmp_path, monkeypatch, tiny_judges):
    """A broken build (here: a head with two outputs in its place) is refused naming the key; a good one fills in
    the path, and a judge with a path is left alone."""
    import launch.judges
    from launch.judge_build import build_missing_judges
    from tests.tiny_judge import build_judge

    cfg = load_config(None, parse_overrides([*RM, "--data.max_operand", "4", "--rewards.models.pm",
                                             "{kind: preference, path: " + tiny_judges["preference"] + "}"]))
    cache = tiny_judges["scalar"].rsplit("/", 1)[0]
    rewards, problem = build_missing_judges(cfg, cache)  # the session's judges: found in the cache, not rebuilt
    assert problem is None and rewards.models["rm"].path == tiny_judges["scalar"]
    assert rewards.models["pm"].path == tiny_judges["preference"] and cfg.rewards.models["rm"].path is None
    two = build_judge(tmp_path / "two", num_labels=2)
    monkeypatch.setattr(launch.judges, "resolve_judge_path", lambda kind, path, max_operand, cache_dir: two)
    _, problem = build_missing_judges(cfg, cache)
    assert problem.startswith("config key 'rewards.models.rm.path'") and "2 outputs" in problem


def test_sync_period_infinity_is_publish_every_never():
    cfg = load_config(None, parse_overrides(["--learner.publish_every", "never", "--learner.total_steps", "40",
                                             "--buffer.max_staleness", "40"]))
    assert cfg.learner.publish_every == "never"
    with pytest.raises(ConfigError, match=r"'buffer.max_staleness': 4 < learner.total_steps - 1 = 39"):
        load_config(None, parse_overrides(["--learner.publish_every", "never", "--learner.total_steps", "40",
                                           "--buffer.max_staleness", "4"]))
    # a period longer than the run never publishes either: the run's length bounds the staleness it needs
    assert load_config(None, parse_overrides(["--learner.publish_every", "1000", "--learner.total_steps", "40",
                                              "--buffer.max_staleness", "39"])).learner.publish_every == 1000
    with pytest.raises(ConfigError, match=r"'learner.publish_every'"):
        load_config(None, parse_overrides(["--learner.publish_every", "0"]))
