"""Learned judges (actors/judge.py): scores equal a plain transformers forward whatever the batching, the preference
path's symmetry and Borda win rates, row faults counted, refusals naming the key; `model:<name>` reward routes; the
config checks that run before any actor starts."""
from __future__ import annotations

import math

import pytest

from actors.judge import Judge, token_batches
from actors.judge_format import encode, group_win_rates, pair_messages, scalar_messages, symmetric_preference
from actors.prompts import Prompt
from actors.reward_config import RewardModelConfig, RewardsConfig, reward_model_problem
from actors.rewards import Rewards
from tests.tiny_judge import build_judge

CHAT = [{"role": "user", "content": "What is 2+3?"}]
RESPONSES = ["5", "The answer is 5.", "hello world, the answer is 5", "B", "What is 5? 5. 5. 5. hello"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> str:
    return build_judge(tmp_path_factory.mktemp("judge") / "rm")


def _direct(path: str, messages: list[dict]) -> float:
    """The judge's one output for one conversation, through transformers alone (batch of one, no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([encode(tok, messages)])).logits[0, 0])


def test_token_batches_pack_longest_first_within_the_budget():
    lengths = [5, 9, 3, 9, 1, 20]
    batches = token_batches(lengths, budget=18)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 18
    assert batches[0] == [5]  # longer than the budget: alone
    assert token_batches(lengths, budget=10**6) == [[5, 1, 3, 0, 2, 4]]


def test_scalar_scores_equal_a_direct_forward_for_every_batch_split(judge_dir):
    expected = [_direct(judge_dir, scalar_messages(CHAT, r)) for r in RESPONSES]
    assert max(expected) - min(expected) > 1e-2  # the rows do score differently, so a mix-up would show
    for budget in (1, 40, 64, 100, 10**6):  # one row per forward ... everything in one
        judge = Judge(RewardModelConfig(max_tokens_per_batch=budget), "rm", judge_dir)
        [scored] = judge.score_groups([(CHAT, RESPONSES)])
        assert all(why == "" for _, why in scored)
        assert [v for v, _ in scored] == pytest.approx(expected, abs=1e-5), budget


def test_normalize_standardises_scalar_scores(judge_dir):
    raw = Judge(RewardModelConfig(), "rm", judge_dir).score_groups([(CHAT, RESPONSES)])[0]
    norm = Judge(RewardModelConfig(normalize=True, mean=1.0, std=2.0), "rm", judge_dir).score_groups([(CHAT, RESPONSES)])[0]
    assert [v for v, _ in norm] == pytest.approx([(v - 1.0) / 2.0 for v, _ in raw], abs=1e-6)


def test_preference_is_symmetric_and_rewards_are_borda_win_rates(judge_dir):
    judge = Judge(RewardModelConfig(kind="preference", max_tokens_per_batch=200), "pm", judge_dir)
    rs = RESPONSES[:4]
    z = {(i, j): _direct(judge_dir, pair_messages(CHAT, rs[i], rs[j])) for i in range(4) for j in range(4) if i != j}
    p = [[symmetric_preference(z[i, j], z[j, i]) if i != j else 0.5 for j in range(4)] for i in range(4)]
    for i in range(4):
        for j in range(4):
            if i != j:
                assert p[i][j] + p[j][i] == pytest.approx(1.0, abs=1e-12)
    assert any(abs(p[i][j] - 0.5) > 1e-3 for i in range(4) for j in range(4) if i != j)  # it prefers something
    [scored] = judge.score_groups([(CHAT, rs)])
    rates = [v for v, _ in scored]
    assert rates == pytest.approx(group_win_rates(p), abs=1e-5)
    assert sum(rates) == pytest.approx(4 / 2, abs=1e-9)  # Borda: n(n-1)/2 wins shared out over n - 1 games each
    # dpo/ipo take best vs worst of the rewards: the most- and least-preferred samples
    assert max(range(4), key=rates.__getitem__) == max(range(4), key=lambda i: sum(p[i]))
    assert judge.score_groups([(CHAT, ["only one"])]) == [[(0.5, "")]]


def _poison(judge: Judge, char: str) -> None:
    """NaN in the embedding of `char`'s token: any row holding it scores NaN, other rows are untouched."""
    import torch

    [tid] = judge.tokenizer.encode(char, add_special_tokens=False)
    with torch.no_grad():
        judge.model.get_input_embeddings().weight[tid] = float("nan")


def test_a_nan_row_scores_zero_with_its_reason_and_the_others_are_unchanged(judge_dir):
    clean = Judge(RewardModelConfig(), "rm", judge_dir).score_groups([(CHAT, RESPONSES)])[0]
    judge = Judge(RewardModelConfig(), "rm", judge_dir)
    _poison(judge, "B")  # only RESPONSES[3] ("B") holds a capital B
    scored = judge.score_groups([(CHAT, RESPONSES)])[0]
    assert scored[3] == (0.0, "reward_nonfinite")
    assert [v for i, (v, _) in enumerate(scored) if i != 3] == pytest.approx(
        [v for i, (v, _) in enumerate(clean) if i != 3], abs=1e-5)


def test_a_preference_sample_that_breaks_the_judge_scores_zero_and_the_rest_rank_among_themselves(judge_dir):
    judge = Judge(RewardModelConfig(kind="preference"), "pm", judge_dir)
    rs = ["5", "Zed", "The answer is 5.", "hello"]
    _poison(judge, "Z")  # not "B": the pair markers hold one ("[Response B]")
    scored = judge.score_groups([(CHAT, rs)])[0]
    assert scored[1] == (0.0, "reward_nonfinite")
    others = [0, 2, 3]
    sub = Judge(RewardModelConfig(kind="preference"), "pm", judge_dir).score_groups([(CHAT, [rs[i] for i in others])])[0]
    assert [scored[i][0] for i in others] == pytest.approx([v for v, _ in sub], abs=1e-5)


def test_a_forward_that_raises_costs_only_its_row(judge_dir, monkeypatch):
    judge = Judge(RewardModelConfig(), "rm", judge_dir)
    bad = encode(judge.tokenizer, scalar_messages(CHAT, RESPONSES[1]))
    forward = judge._forward

    def flaky(rows):
        if bad in rows:
            raise RuntimeError("judge kernel failed")
        return forward(rows)

    monkeypatch.setattr(judge, "_forward", flaky)
    scored = judge.score_groups([(CHAT, RESPONSES)])[0]
    assert scored[1] == (0.0, "reward_error:RuntimeError")
    assert all(why == "" and math.isfinite(v) for i, (v, why) in enumerate(scored) if i != 1)


def test_long_inputs_keep_their_end(judge_dir):
    judge = Judge(RewardModelConfig(max_length=16), "rm", judge_dir)
    ids = judge.encode(scalar_messages(CHAT, "x" * 50))
    full = encode(judge.tokenizer, scalar_messages(CHAT, "x" * 50))
    assert ids == full[-16:] and judge.truncated == 1


@pytest.mark.parametrize("build, expected", [
    (lambda tmp: str(tmp / "missing"), "does not exist"),
    (lambda tmp: build_judge(tmp / "two", num_labels=2), "2 outputs"),
    (lambda tmp: build_judge(tmp / "plain", chat_template=False), "no chat template"),
])
def test_judge_refuses_what_it_cannot_serve_naming_the_key_and_path(tmp_path, build, expected):
    path = build(tmp_path)
    with pytest.raises(ValueError) as err:
        Judge(RewardModelConfig(), "rm", path)
    assert expected in str(err.value) and "rewards.models.rm.path" in str(err.value) and path in str(err.value)


def test_model_routes_defer_or_score_as_groups():
    a, b = Prompt("a", "1+1=", "2"), Prompt("b", "2+2=", "4", data_source="math")
    calls = []

    def judge(name, groups):
        calls.append((name, groups))
        return [[(float(len(r)), "") for r in responses] for _, responses in groups]

    rewards = Rewards({"default": "model:rm", "math": "arithmetic"}, judge=judge)
    prompts, responses = [a, a, b, b], ["22", "2", "4", "5"]
    assert rewards.score(prompts, responses, defer=True) == [None, None, (1.0, ""), (0.0, "")]
    assert not calls
    assert rewards.score(prompts, responses) == [(2.0, ""), (1.0, ""), (1.0, ""), (0.0, "")]
    assert calls == [("rm", [([{"role": "user", "content": "1+1="}], ["22", "2"])])]  # one group: one prompt
    with pytest.raises(RuntimeError, match="no judge service"):
        Rewards("model:rm").score([a], ["2"])
    with pytest.raises(ValueError, match="name a model"):
        Rewards("model:")

    def broken(name, groups):
        raise TimeoutError("judge service unreachable")

    assert Rewards("model:rm", judge=broken).score([a, a], ["2", "3"]) == [(0.0, "reward_error:TimeoutError")] * 2


def _problem(models: dict, reward="model:rm", n=4, evaluates=False):
    return reward_model_problem({"actors.reward": reward}, RewardsConfig(models=models), n,
                                {"data.eval": reward} if evaluates else None)


def test_config_refusals_name_the_key(tmp_path, judge_dir):
    ok = RewardModelConfig(path=judge_dir)
    assert _problem({"rm": ok}) is None
    assert "'actors.reward': model:other names no entry" in _problem({"rm": ok}, reward={"default": "model:other"})
    assert "'rewards.models.rm.path': not set" in _problem({"rm": RewardModelConfig()})
    missing = str(tmp_path / "nowhere")
    assert _problem({"rm": RewardModelConfig(path=missing)}) == f"config key 'rewards.models.rm.path': {missing} does not exist"
    two = build_judge(tmp_path / "two", num_labels=2)
    assert "'rewards.models.rm.path'" in _problem({"rm": RewardModelConfig(path=two)}) and "2 outputs" in _problem(
        {"rm": RewardModelConfig(path=two)})
    pm = RewardModelConfig(path=judge_dir, kind="preference")
    assert "'rewards.models.rm.kind'" in _problem({"rm": pm}, n=1)
    assert _problem({"rm": pm}) is None  # group-relative rewards suit every objective here (each uses a group baseline)
    assert "'data.eval'" in _problem({"rm": pm}, evaluates=True)
    assert _problem({"rm": ok}, evaluates=True) is None
    assert "normalize" in _problem({"rm": RewardModelConfig(path=judge_dir, kind="preference", normalize=True)})


def test_load_config_refuses_before_any_actor_starts(tmp_path, judge_dir):
    from launch.config import ConfigError, load_config, parse_overrides

    cfg = load_config(None, parse_overrides(["--actors.reward", "model:rm", "--rewards.models",
                                             f"{{rm: {{path: {judge_dir}}}}}"]))
    assert cfg.rewards.models["rm"].path == judge_dir and cfg.rewards.models["rm"].kind == "scalar"
    with pytest.raises(ConfigError, match="'actors.reward': model:rm names no entry"):
        load_config(None, parse_overrides(["--actors.reward", "model:rm"]))
    with pytest.raises(ConfigError, match=r"'data.sources\[1\].reward': model:nope names no entry"):
        load_config(None, parse_overrides(["--rewards.models", f"{{rm: {{path: {judge_dir}}}}}", "--data.sources",
                                           "[{name: a, train: 'synthetic:arithmetic', reward: 'model:rm'}, "
                                           "{name: b, train: 'synthetic:arithmetic', reward: 'model:nope'}]"]))
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].eval': greedy evaluation"):
        load_config(None, parse_overrides(["--rewards.models", f"{{pm: {{kind: preference, path: {judge_dir}}}}}",
                                           "--data.sources", "[{name: a, train: 'synthetic:arithmetic', "
                                           "eval: 'synthetic:arithmetic', reward: 'model:pm'}]"]))
    with pytest.raises(ConfigError, match="unknown config key 'rewards.models.rm.paht'"):
        load_config(None, parse_overrides(["--actors.reward", "model:rm", "--rewards.models", "{rm: {paht: x}}"]))


def test_launch_scale_writes_judge_pool_sizes(tmp_path):
    import json

    import yaml

    from launch.control import ControlFile
    from launch.scale import main

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"rewards": {"models": {"rm": {"path": "x"}}}}))
    control = ControlFile(tmp_path)
    assert main(["--run", str(tmp_path), "--reward-actors", "rm=3"]) == 0
    assert json.loads((tmp_path / "control.json").read_text())["reward_actors"] == {"rm": 3}
    assert control.poll().reward_actors == {"rm": 3}
    assert main(["--run", str(tmp_path), "--reward-actors", "pm=2"]) == 2  # no such judge
    assert main(["--run", str(tmp_path), "--reward-actors", "rm"]) == 2  # not NAME=N


def test_control_resizes_only_known_judges_that_changed(judge_dir):
    from launch.config import load_config, parse_overrides
    from launch.judge_service import scale_judges

    class Pool:  # stands in for the service actor's handle: records what the launcher asks of it
        def __init__(self):
            self.asked = []
            self.scale = self

        def remote(self, name, n):
            self.asked.append((name, n))

    cfg = load_config(None, parse_overrides(["--actors.reward", "model:rm", "--rewards.models",
                                             f"{{rm: {{path: {judge_dir}, num_actors: 2}}}}"]))
    service, sizes, events = Pool(), {}, []
    scale_judges(service, cfg, {"rm": 2}, sizes, events)  # the size it has: nothing to do
    scale_judges(service, cfg, {"rm": 3, "pm": 1}, sizes, events)
    scale_judges(service, cfg, {"rm": 3}, sizes, events)  # control.json re-read unchanged
    assert service.asked == [("rm", 3)]
    assert [e["event"] for e in events] == ["judges_scaled", "scale_refused"] and "'pm'" in events[1]["error"]
