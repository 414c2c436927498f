"""Fast unit tests of the plain pieces: rewards, prompt data, weight transports, batching."""
from __future__ import annotations

import pytest
import torch

from actors.rewards import arithmetic_reward, math_verify_reward, resolve_reward, safe_reward
from buffer.schema import Rollout, rollouts_from_arrow, rollouts_to_arrow
from actors.prompts import Prompt
from launch.config import DataConfig
from launch.data import DataError, PromptStream, load_prompts
from learner.batch import response_logprobs, shard_groups, to_tensors
from transport.base import WeightHandle
from transport.disk import DiskTransport


def test_arithmetic_reward_is_exact():
    assert arithmetic_reward("12", "12") == 1.0
    assert arithmetic_reward(" 1 2 ", "12") == 1.0
    assert arithmetic_reward("121", "12") == 0.0
    assert arithmetic_reward("12+3", "12") == 0.0
    assert arithmetic_reward("", "0") == 0.0


def test_math_verify_reward():
    assert math_verify_reward("The answer is $\\boxed{\\frac{1}{2}}$", "$0.5$") == 1.0
    assert math_verify_reward("The answer is $\\boxed{3}$", "$4$") == 0.0


def test_user_reward_from_path_and_bad_values(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(resp, ans):\n    return float(len(resp))\n\ndef boom(resp, ans):\n    raise RuntimeError('x')\n"
                 "\ndef nan(resp, ans):\n    return float('nan')\n")
    p = Prompt("p", "q", "b")
    assert resolve_reward(f"{f}:score")([p], ["abc"]) == [3.0]  # fn(response, answer): the positional convention
    assert safe_reward(resolve_reward(f"{f}:boom"), p, "a") == (0.0, "reward_error:RuntimeError")
    assert safe_reward(resolve_reward(f"{f}:nan"), p, "a") == (0.0, "reward_nonfinite")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_reward(f"{tmp_path}/nope.py:score")
    with pytest.raises(ValueError, match="has no function missing"):
        resolve_reward(f"{f}:missing")
    with pytest.raises(ValueError, match="not one of"):
        resolve_reward("no_such_builtin")


def test_prompt_file_bad_rows_are_counted_and_skipped(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": 2}\nnot json\n{"question": "x"}\n\n{"id": "k", "prompt": "2+2=", "answer": "4"}\n[1]\n')
    ps = load_prompts(str(f))
    assert [p.text for p in ps.prompts] == ["1+1=", "2+2="] and ps.prompts[1].id == "k" and ps.prompts[0].answer == "2"
    assert ps.skipped == {"bad_json": 1, "missing_prompt": 1, "not_an_object": 1}
    assert len(load_prompts("synthetic:arithmetic", DataConfig(max_operand=4)).prompts) == 25
    with pytest.raises(DataError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_prompt_stream_covers_epochs_and_restores():
    prompts = load_prompts("synthetic:arithmetic", DataConfig(max_operand=3)).prompts  # 16
    s = PromptStream(prompts, seed=1)
    first = [p.id for p in s.take(16)]
    assert sorted(first) == sorted(p.id for p in prompts)  # an epoch is a permutation
    s.take(5)
    state = s.state()
    nxt = [p.id for p in s.take(20)]
    s2 = PromptStream(prompts, seed=1)
    s2.restore(state)
    assert [p.id for p in s2.take(20)] == nxt


def _rollout(gid: str, i: int, prompt_len=3, n_resp=2, reward=0.0, version=0) -> Rollout:
    return Rollout(rollout_id=f"{gid}-{i}", prompt_id="p", group_id=gid, group_size=2, token_ids=list(range(prompt_len + n_resp)),
                   prompt_len=prompt_len, behaviour_logprobs=[-0.5] * n_resp, reward=reward, policy_version=version,
                   generator_id="g", finish_reason="stop", t_start=0.0, t_end=1.0)


def test_rollout_validation_and_roundtrip():
    r = _rollout("a", 0)
    assert r.token_versions == [0, 0] and r.response_ids == [3, 4]
    assert rollouts_from_arrow(rollouts_to_arrow([r])) == [r]
    with pytest.raises(ValueError, match="behaviour log-probs"):
        Rollout(**{**r.__dict__, "behaviour_logprobs": [0.0]})


def test_batching_aligns_response_tokens_and_shards_whole_groups():
    rows = [_rollout("a", 0, 3, 2, 1.0, 5), _rollout("a", 1, 3, 4), _rollout("b", 0, 2, 1), _rollout("b", 1, 2, 3)]
    batch = rollouts_to_arrow(rows)
    tb = to_tensors(batch, pad_id=0)
    assert tb.input_ids.shape == (4, 7) and tb.resp_mask.shape == (4, 4)
    assert tb.resp_mask.sum(1).tolist() == [2, 4, 1, 3]
    assert tb.resp_index[0, :2].tolist() == [2, 3]  # logits at 2 predict token 3, the first response token
    assert tb.group_ids.tolist() == [0, 0, 1, 1] and tb.versions.tolist() == [5, 0, 0, 0]
    shard0, shard1 = shard_groups(batch, 0, 2), shard_groups(batch, 1, 2)
    assert set(shard0.column("group_id").to_pylist()) == {"a"} and set(shard1.column("group_id").to_pylist()) == {"b"}
    # response_logprobs picks log-softmax(head(hidden) / T) at the response positions
    hidden = torch.randn(4, 7, 5)
    head = torch.nn.Linear(5, 11, bias=False)
    ids = torch.randint(0, 11, (4, 7))
    logp, ent = response_logprobs(hidden, head, ids, tb.resp_index, tb.resp_mask, temperature=0.7, chunk_tokens=3)
    ref = torch.log_softmax(head(hidden) / 0.7, -1)
    assert torch.allclose(logp[1, 2], ref[1, 4, ids[1, 5]])
    assert torch.all(ent >= 0) and torch.all(logp[tb.resp_mask == 0] == 0)


def test_disk_transport_roundtrip_keeps_latest_and_times_out(tmp_path):
    t = DiskTransport(str(tmp_path), keep=2)
    state = {"w": torch.randn(3, 4), "b": torch.randn(4).to(torch.bfloat16)}
    handles = [t.publish(v, {k: x + v for k, x in state.items()}) for v in (1, 2, 3)]
    tied = torch.randn(5, 2)
    got = dict(t.fetch(t.publish(4, {"embed": tied, "lm_head": tied}), timeout_s=1))  # tied embeddings share storage
    assert torch.equal(got["embed"], tied) and torch.equal(got["lm_head"], tied)
    got = dict(t.fetch(handles[-1], timeout_s=1))
    assert torch.equal(got["w"], state["w"] + 3) and got["b"].dtype == torch.bfloat16
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # older versions are cleaned up
    missing = WeightHandle(9, "disk", str(tmp_path / "never.safetensors"), 0)
    with pytest.raises(TimeoutError, match="version 9"):
        list(t.fetch(missing, timeout_s=0.2))


def test_ledger_finds_lost_and_twice_trained_groups():
    from collections import Counter

    from launch.ledger import ledger

    buffer_ledger = {"requests": {"r0": {"stored": 3, "skipped": {"prompt_too_long": 1}},
                                  "r1": {"stored": 2, "skipped": {}}},
                     "held_group_ids": ["e"]}
    stats = {"drops_stale_at_sample": 1, "duplicate_puts": 1}
    ok = ledger(8, 2, 1, 2, Counter({"a": 1, "b": 1, "c": 1}), buffer_ledger, stats, max_reuse=1)
    # 8 dispatched = 1 skipped + 1 dropped + 3 trained + 1 held + 2 unfinished
    assert ok["groups_lost"] == 0 and ok["groups_trained_too_often"] == 0 and ok["duplicate_puts_refused"] == 1
    lost = ledger(9, 2, 0, 2, Counter({"a": 1, "b": 2, "c": 1}), buffer_ledger, stats, max_reuse=1)
    assert lost["groups_lost"] == 1 and lost["groups_trained_too_often"] == 1
