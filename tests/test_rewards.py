"""Rewards: what a function is given (by its parameter names), batched calls, routing by data_source, failures
counted and scored 0, and math_verify's answer forms."""
from __future__ import annotations

import pytest

from actors.prompts import Prompt
from actors.rewards import Rewards, math_verify_reward, resolve_reward

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
P1 = Prompt("p1", "What is 2+2?", "4", messages=CHAT, data_source="gsm8k", metadata={"level": 3})
P2 = Prompt("p2", "1+2=", "3", data_source="arith")

USER = '''
import json

def legacy(text, ref):
    return float(text == ref)

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return json.dumps([data_source, solution_str, ground_truth, extra_info])

def sees_prompt(prompt, messages, response, answer, metadata):
    return json.dumps([prompt, messages, response, answer, metadata])

def anything(response, **kwargs):
    return json.dumps(sorted(kwargs))

CALLS = []

def batched(responses, answers, data_sources):
    CALLS.append(len(responses))
    return [float(r == a) + (10 if s == "gsm8k" else 0) for r, a, s in zip(responses, answers, data_sources)]

def short(solution_strs):
    return [1.0]

def boom(responses):
    raise KeyError("x")

def odd(response, answer, temperature):
    return 1.0

def sometimes(response, answer):
    if response == "raise":
        raise ValueError("no")
    return float("inf") if response == "inf" else 0.5
'''


@pytest.fixture
def user(tmp_path):
    f = tmp_path / "user_rewards.py"
    f.write_text(USER)
    return str(f)


def _raw(spec, prompts, responses):
    return resolve_reward(spec)(prompts, responses)


def test_a_reward_gets_what_its_parameter_names_ask_for(user):
    import json

    assert _raw(f"{user}:legacy", [P2, P2], ["3", "4"]) == [1.0, 0.0]  # fn(response, answer) still works
    got = json.loads(_raw(f"{user}:compute_score", [P1], ["4"])[0])  # verl's compute_score, unchanged
    assert got == ["gsm8k", "4", "4", {"level": 3}]
    prompt, messages, response, answer, metadata = json.loads(_raw(f"{user}:sees_prompt", [P1], ["four"])[0])
    assert (prompt, messages, response, answer, metadata) == ("What is 2+2?", CHAT, "four", "4", {"level": 3})
    # a text prompt is one user turn when a reward asks for messages
    assert json.loads(_raw(f"{user}:sees_prompt", [P2], ["3"])[0])[1] == [{"role": "user", "content": "1+2="}]
    assert json.loads(_raw(f"{user}:anything", [P1], ["x"])[0]) == ["answer", "data_source", "messages", "metadata", "prompt"]
    with pytest.raises(ValueError, match=r"parameter\(s\) \['temperature'\]"):
        resolve_reward(f"{user}:odd")


def test_batched_rewards_get_one_call_per_source_and_failures_score_zero(user):
    rewards = Rewards(f"{user}:batched")
    calls = rewards.route("").fn.__globals__["CALLS"]
    scores = rewards.score([P1, P2, P1, P2], ["4", "3", "5", "0"])
    assert scores == [(11.0, ""), (1.0, ""), (10.0, ""), (0.0, "")]
    assert sorted(calls) == [2, 2]  # one call per data_source, each with that source's rows
    assert Rewards(f"{user}:short").score([P1, P1], ["a", "b"]) == [(0.0, "reward_error:RewardLengthError")] * 2
    assert Rewards(f"{user}:boom").score([P1], ["a"]) == [(0.0, "reward_error:KeyError")]
    # per-sample: one failure costs that sample only
    assert Rewards(f"{user}:sometimes").score([P2] * 3, ["raise", "inf", "ok"]) == [
        (0.0, "reward_error:ValueError"), (0.0, "reward_nonfinite"), (0.5, "")]


def test_routing_by_data_source(user):
    rewards = Rewards({"arith": "arithmetic", "gsm8k": "math_verify"})
    assert rewards.score([P2, P1, P2], ["3", "The answer is \\boxed{4}", "4"]) == [(1.0, ""), (1.0, ""), (0.0, "")]
    other = Prompt("p3", "x", "1", data_source="other")
    assert rewards.unrouted(["arith", "other"]) == ["other"]
    assert rewards.score([other], ["1"]) == [(0.0, "reward_unrouted:other")]
    with_default = Rewards({"gsm8k": "math_verify", "default": f"{user}:legacy"})
    assert with_default.unrouted(["arith", "other"]) == []
    assert with_default.score([other, P1], ["1", "#### 4"]) == [(1.0, ""), (1.0, "")]


@pytest.mark.parametrize("response,answer,expected", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("so the answer is \\boxed{41}.", "42", 0.0),
    ("She pays 6*7 = 42 dollars.\n#### 42", "Natalia sold 48/2 = 24 clips...\n#### 42", 1.0),  # GSM8K on both sides
    ("\\boxed{1234}", "#### 1,234", 1.0),  # GSM8K's thousands separators
    ("The answer is $\\boxed{\\frac{1}{2}}$", "\\boxed{0.5}", 1.0),
    ("I am not sure.", "#### 7", 0.0),
])
def test_math_verify_answer_forms(response, answer, expected):
    assert math_verify_reward(response, answer) == expected


def test_math_verify_runs_off_the_main_thread():
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(math_verify_reward("\\boxed{3}", "3")))
    t.start()
    t.join()
    assert out == [1.0]
