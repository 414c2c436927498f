"""data.offline (issue 17 parts 1-2): the config refusals, the loader (formats, an exported Parquet, counted skips),
the buffer's offline share of each batch, and unknown behaviour log-probs never reaching a loss as non-finite."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from buffer.config import BufferConfig
from buffer.replay import ReplayBuffer
from buffer.schema import SCHEMA_VERSION, rollouts_to_arrow
from buffer.testing import fake_batch, fake_group
from launch.config import ConfigError, load_config
from learner.objectives import REGISTRY, LossInputs, ObjectiveConfig, compute_loss
from learner.objectives.config import READS, reads_behaviour

READS_BEHAVIOUR = {"tis", "icepop", "seq_is", "geo_mask", "grpo", "dr_grpo", "ppo", "decoupled_ppo", "gspo", "cispo",
                   "rec", "opmd"}


SMALL = {"actors.prompts_per_request": 1, "learner.micro_batch_groups": 1}


def _objective(name: str, **kw) -> dict:
    knobs = {"learner.objective.name": name}
    if name == "dpo":
        knobs["learner.objective.beta"] = 0.1
    return {**knobs, **{f"learner.objective.{k}": v for k, v in kw.items()}}


def _cfg(tmp_path, behaviour: str, objective: dict, **more):
    f = tmp_path / "offline.jsonl"
    f.write_text('{"prompt": "1+2=", "response": "3", "reward": 1}\n')
    return load_config(None, {"data.offline": [{"path": str(f), "behaviour": behaviour, "source": "expert"}],
                              "data.offline_fraction": 0.5, "learner.groups_per_step": 2, **SMALL, **objective,
                              **more})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_behaviour_none_is_refused_exactly_by_objectives_that_read_it(tmp_path, name):
    if name in READS_BEHAVIOUR:
        with pytest.raises(ConfigError, match=rf"data.offline\[0\].behaviour.*expert.*objective '{name}'"):
            _cfg(tmp_path, "none", _objective(name))
    else:
        assert _cfg(tmp_path, "none", _objective(name)).data.offline[0].behaviour == "none"
    for behaviour in ("recorded", "reference"):  # every objective takes rows whose behaviour log-probs are known
        cfg = _cfg(tmp_path, behaviour, _objective(name))
        assert cfg.learner.behaviour_fill == ("reference" if behaviour == "reference" else "policy")


def test_rec_reads_behaviour_only_through_clip_weight_or_k2(tmp_path):
    assert _cfg(tmp_path, "none", _objective("rec", rec_clip="none")).learner.objective.rec_clip == "none"
    for knob in ({"rec_clip": "none", "rec_weight": "tis"}, {"rec_clip": "none", "rec_regulariser": "k2"}):
        with pytest.raises(ConfigError, match="objective 'rec'"):
            _cfg(tmp_path, "none", _objective("rec", **knob))


def test_offline_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="data.offline_fraction.*data.offline is empty"):
        load_config(None, {"data.offline_fraction": 0.5})
    with pytest.raises(ConfigError, match="whole number of groups"):
        _cfg(tmp_path, "recorded", {}, **{"learner.groups_per_step": 4, "data.offline_fraction": 0.3})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, {"data.offline": [{"path": str(tmp_path / "nope.jsonl")}], "data.offline_fraction": 1.0})
    with pytest.raises(ConfigError, match="offline_fraction is 0"):
        _cfg(tmp_path, "recorded", {}, **{"data.offline_fraction": 0.0})
    with pytest.raises(ConfigError, match="eval_every"):
        _cfg(tmp_path, "recorded", {}, **{"data.offline_fraction": 1.0, "data.eval_every": 2,
                                          "data.eval": str(tmp_path / "offline.jsonl")})


def test_objectives_that_accept_none_never_read_behaviour():
    """The table behind the refusal, against the functions: NaN behaviour log-probs, finite loss and gradient."""
    for name in sorted(REGISTRY):
        cfg = ObjectiveConfig(name=name, **({"beta": 0.1} if "beta" in READS[name] else {}),
                              **({"max_len": 4} if "max_len" in READS[name] else {}))
        if reads_behaviour(cfg):
            continue
        logp = (-torch.rand(4, 4) - 0.1).requires_grad_()
        inp = LossInputs(logp=logp, behaviour_logp=torch.full((4, 4), math.nan), mask=torch.ones(4, 4),
                         rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                         ref_logp=-torch.rand(4, 4) - 0.1, prox_logp=-torch.rand(4, 4) - 0.1)
        loss, _ = compute_loss(cfg, inp)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), name


# ---- the loader ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _load(tiny_model_dir, tokenizer, tmp_path, sources, **more):
    from launch.offline_data import load_offline

    cfg = load_config(None, {"model.path": tiny_model_dir, "data.max_operand": 4, "data.offline": sources,
                             "data.offline_fraction": 1.0, "learner.groups_per_step": 1, **SMALL, **more})
    return cfg, load_offline(cfg, tokenizer)


def test_jsonl_rows_skips_counted_and_prompts_rendered_like_online(tiny_model_dir, tokenizer, tmp_path):
    from actors.prompts import Prompt, render_all
    from launch.data import prompt_format

    ids = tokenizer("3", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "1+2=", "response": "3", "reward": 1.0},
            {"prompt": "1+2=", "response": ids, "reward": 0},  # token ids: the same group (same rendered prompt)
            {"messages": [{"role": "user", "content": "3+3="}, {"role": "assistant", "content": "6"}], "reward": 1},
            {"prompt": "2+2=", "reward": 1}, {"prompt": "2+2=", "response": "4", "reward": "yes"},
            {"prompt": "2+2=", "response": "4", "reward": float("nan")},
            {"prompt": "2+2=", "response": "4" * 40, "reward": 1}, {"response": "4", "reward": 1},
            {"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": [10**6], "reward": 1}]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    cfg, (got,) = _load(tiny_model_dir, tokenizer, tmp_path, [{"path": str(f), "behaviour": "none", "source": "ex"}])
    assert got.skipped == {"missing_response": 1, "bad_reward": 2, "response_too_long": 1, "missing_prompt": 1,
                           "missing_reward": 1, "bad_response": 1, "bad_json": 1}
    assert got.table.num_rows == 3 and got.groups == 2
    r = got.table.to_pylist()
    prompt = render_all(tokenizer, [Prompt(id="x", text="1+2=", answer="")], prompt_format(cfg.data))[0]
    assert r[0]["token_ids"] == prompt + ids and r[1]["token_ids"] == prompt + ids and r[0]["prompt_len"] == len(prompt)
    assert r[0]["group_id"] == r[1]["group_id"] and r[0]["group_size"] == 2 and r[2]["group_size"] == 1
    assert all(math.isnan(x) for x in r[0]["behaviour_logprobs"]) and r[0]["policy_version"] == -1
    assert {x["data_source"] for x in r} == {"ex"} and r[2]["token_ids"][r[2]["prompt_len"]:] == tokenizer(
        "6", add_special_tokens=False)["input_ids"]


def test_parquet_recorded_behaviour_and_an_unusable_source(tiny_model_dir, tokenizer, tmp_path):
    from launch.data import DataError

    ids = tokenizer("34", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "1+2=", "response": ids, "reward": 1.0, "behaviour_logprobs": [-0.25] * len(ids),
             "policy_version": 3},
            {"prompt": "1+2=", "response": ids, "reward": 0.0},  # recorded, but absent
            {"prompt": "1+2=", "response": ids, "reward": 0.0, "behaviour_logprobs": [-0.1]}]  # wrong length
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    _, (got,) = _load(tiny_model_dir, tokenizer, tmp_path, [{"path": str(f), "behaviour": "recorded"}])
    assert got.skipped == {"missing_behaviour_logprobs": 1, "bad_behaviour_logprobs": 1}
    (row,) = got.table.to_pylist()
    assert row["behaviour_logprobs"] == [-0.25] * len(ids) and row["token_versions"] == [3] * len(ids)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2=", "reward": 1}\n{"prompt": "1+2=", "response": "3"}\n')
    with pytest.raises(DataError, match=r"offline source mine: no usable rows.*missing_response': 1.*missing_reward"):
        _load(tiny_model_dir, tokenizer, tmp_path, [{"path": str(bad), "behaviour": "none", "source": "mine"}])


def _exported(tmp_path, tiny_model_dir) -> tuple:
    from buffer.rollout_log import RolloutLog
    from launch.export import export

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    log = RolloutLog(str(run / "rollouts"))
    rows = fake_group("g1", group_size=2, prompt_len=3, response_len=4) + fake_group("g2", group_size=2,
                                                                                    prompt_len=3, response_len=4)
    for k, r in enumerate(rows):
        r.token_ids = [5 + (t + k) % 20 for t in range(7)]
        r.behaviour_logprobs = [float(np.float32(-0.1 * (k + 1) - 1e-7 * t)) for t in range(4)]
    batch = rollouts_to_arrow(rows)
    log.append(batch.slice(0, 2))
    log.append(batch.slice(2, 2))
    out = tmp_path / "export.parquet"
    export(run, out, tokenizer_dir=tiny_model_dir)
    return out, rows


def test_exported_parquet_loads_bit_exact_and_a_newer_schema_is_refused(tiny_model_dir, tokenizer, tmp_path):
    from launch.data import DataError

    out, rows = _exported(tmp_path, tiny_model_dir)
    _, (got,) = _load(tiny_model_dir, tokenizer, tmp_path, [{"path": str(out), "behaviour": "recorded"}],
                      **{"actors.max_tokens": 8})
    back = got.table.to_pylist()
    assert got.groups == 2 and not got.skipped
    assert [r["token_ids"] for r in back] == [r.token_ids for r in rows]
    assert [r["behaviour_logprobs"] for r in back] == [r.behaviour_logprobs for r in rows]  # float32, bit-exact
    table = pq.read_table(out)
    newer = tmp_path / "newer.parquet"
    pq.write_table(table.replace_schema_metadata({b"relay.schema_version": str(SCHEMA_VERSION + 1).encode()}), newer)
    with pytest.raises(DataError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this Relay's"):
        _load(tiny_model_dir, tokenizer, tmp_path, [{"path": str(newer), "behaviour": "recorded"}])


# ---- the buffer's mixing ------------------------------------------------------------------------------------

def _offline_pool(n: int) -> pa.Table:
    return pa.Table.from_batches([fake_batch([f"offline:x:{i}" for i in range(n)], group_size=2, policy_version=-1)])


def test_buffer_serves_the_offline_share_of_every_batch():
    buf = ReplayBuffer(BufferConfig(capacity_groups=16, max_staleness=4), groups_per_step=4, offline_per_step=1)
    assert buf.add_offline(_offline_pool(3)) == 3
    assert buf.sample(4, 0, timeout=0.05) is None  # three online groups needed, none held
    buf.put(fake_batch(["a", "b", "c", "d", "e", "f"]))
    for _ in range(2):
        batch = buf.sample(4, 0, timeout=1.0)
        groups = list(dict.fromkeys(batch.column("group_id").to_pylist()))
        assert len(groups) == 4 and sum(g.startswith("offline:") for g in groups) == 1
    stats = buf.stats()
    assert stats["served_offline"] == 2 and stats["samples"] == 6 and stats["offline_pool_groups"] == 3
    assert stats["size_groups"] == 0  # fifo, max_reuse 1: the six online groups were each served once


def test_admission_counts_only_the_online_share():
    buf = ReplayBuffer(BufferConfig(capacity_groups=16, max_staleness=0), groups_per_step=4, offline_per_step=1)
    assert buf.try_admit(3, 0) and not buf.try_admit(1, 0)


def test_purely_offline_batches_wait_for_nothing_and_hold_distinct_groups():
    buf = ReplayBuffer(BufferConfig(capacity_groups=8, sampler="uniform"), groups_per_step=4, offline_per_step=4)
    buf.add_offline(_offline_pool(5))
    for step in range(5):
        groups = buf.sample(4, step, timeout=0.0).column("group_id").to_pylist()
        assert len(set(groups)) == 4 and len(groups) == 8
    assert buf.stats()["offline_pool_groups"] == 5  # never used up
    with pytest.raises(ValueError, match="group_size"):
        buf.add_offline(_offline_pool(1).slice(0, 1))


# ---- nothing non-finite reaches a loss ----------------------------------------------------------------------

def test_fill_behaviour_replaces_every_unknown_entry():
    from learner.learner import fill_behaviour

    behaviour = torch.tensor([[-0.5, math.nan], [math.nan, math.inf]])
    logp, ref = torch.full((2, 2), -1.0), torch.full((2, 2), -2.0)
    assert fill_behaviour(behaviour, logp, ref, "policy").tolist() == [[-0.5, -1.0], [-1.0, -1.0]]
    assert fill_behaviour(behaviour, logp, ref, "reference").tolist() == [[-0.5, -2.0], [-2.0, -2.0]]
    with pytest.raises(ValueError, match="reference"):
        fill_behaviour(behaviour, logp, None, "reference")


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory) -> str:
    from tests.micro_model import build_micro_model

    return build_micro_model(tmp_path_factory.mktemp("micro"))


@pytest.mark.parametrize("name,fill", [("agro", "policy"), ("tis", "reference"), ("decoupled_ppo", "policy")])
def test_nan_behaviour_rows_through_the_learner_give_finite_loss_and_gradients(micro_model_dir, dist_env,
                                                                               monkeypatch, name, fill):
    """Half the rows without behaviour log-probs (NaN), through Learner.train_tensors: the loss, every metric and
    every gradient are finite; the mismatch alarm ignores the NaN rows."""
    from learner.batch import to_tensors
    from learner.config import LearnerConfig
    from learner.learner import Learner

    rows = fake_group("on", group_size=2, prompt_len=3, response_len=4) + fake_group("off", group_size=2, prompt_len=3,
                                                                                     response_len=4, policy_version=-1)
    for k, r in enumerate(rows):
        r.token_ids = [2 + (5 * t + 3 * k) % 30 for t in range(7)]
        if r.group_id == "off":
            r.behaviour_logprobs = [math.nan] * 4
    cfg = LearnerConfig(groups_per_step=2, behaviour_fill=fill, grad_clip=0.0,
                        objective=ObjectiveConfig(name=name, max_len=4, **({"beta": 0.1} if name == "agro" else {})))
    learner = Learner(cfg, micro_model_dir, group_size=2, temperature=1.0)
    grads = []
    monkeypatch.setattr(learner.engine, "step", lambda: grads.append(
        [p.grad.clone() for p in learner.engine.module.parameters() if p.grad is not None]))
    metrics = learner.train_tensors(to_tensors(rollouts_to_arrow(rows), pad_id=0))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert grads[0] and all(torch.isfinite(g).all() for g in grads[0])
    assert any(float(g.abs().sum()) > 0 for g in grads[0])
    assert metrics["mismatch_tokens"] == 8  # only the rows whose behaviour log-probs are known (version 0)


def test_reference_sources_need_the_reference_fill_and_offline_runs_reserve_no_rollout_actor(tmp_path):
    from launch.train import placement, resource_requests

    with pytest.raises(ConfigError, match="learner.behaviour_fill"):
        _cfg(tmp_path, "reference", {"learner.behaviour_fill": "policy"})
    cfg = _cfg(tmp_path, "none", _objective("agro"), **{"data.offline_fraction": 1.0, "actors.num_gpus": 1})
    assert placement(cfg)[1] == {**placement(cfg)[1], "actor": "rollout", "count": 0}
    assert not any(key.startswith("actors.") for key in resource_requests(cfg))
