"""data.sources, the multi-task mixture: config rules and reward routes, per-source loading and tags, weighted
draws (proportions, determinism, epochs, exact resume), per-source metrics and summary."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from actors.prompts import Prompt
from launch.config import ConfigError, RunConfig, load_config
from launch.mixture import MixtureStream, source_summary
from launch.sources_config import SourceConfig, effective_data, with_source_rewards
from launch.state import RunState

ROOT = Path(__file__).resolve().parents[1]
ARITH = {"name": "arith", "train": "synthetic:arithmetic", "reward": "arithmetic", "weight": 3}


def _rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prompts(tag: str, n: int) -> list[Prompt]:
    return [Prompt(f"{tag}-{i}", f"{tag}{i}", "", data_source=tag) for i in range(n)]


# ---- config ------------------------------------------------------------------------------------------------
def test_every_source_reward_becomes_a_route_and_the_config_reloads_the_same(tmp_path):
    sums = _rows(tmp_path / "sums.jsonl", [{"prompt": "1+2+3=", "answer": "6"}])
    cfg = load_config(None, {"data.sources": [ARITH, {"name": "sums", "train": sums, "reward": "math_verify"}]})
    assert cfg.actors.reward == {"arith": "arithmetic", "sums": "math_verify"}  # no stray default route
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a resumed run's config.yaml
    # a source without a reward of its own is routed by actors.reward: its default, or an entry under its name
    cfg = load_config(None, {"actors.reward": "math_verify", "data.sources": [ARITH, {"name": "s", "train": sums}]})
    assert cfg.actors.reward == {"default": "math_verify", "arith": "arithmetic"}
    cfg = load_config(None, {"actors.reward": {"s": "math_verify"}, "data.sources": [ARITH, {"name": "s", "train": sums}]})
    assert cfg.actors.reward == {"s": "math_verify", "arith": "arithmetic"}
    # model:<name> specs are passed through untouched (the reward-model service resolves them)
    routes = with_source_rewards("arithmetic", False, [SourceConfig(name="chat", train="x", reward="model:rm")])
    assert routes == {"chat": "model:rm"}


def test_the_shipped_mixture_config_loads_with_its_data(monkeypatch):
    monkeypatch.chdir(ROOT)  # its JSONL files are relative to the repository, as `python -m launch.train` runs
    cfg = load_config(str(ROOT / "configs" / "mixture_tiny.yaml"))
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("arith", 3.0), ("sums", 1.0)]
    assert cfg.actors.reward == {"arith": "arithmetic", "sums": "math_verify"}
    assert all(Path(p).is_file() for p in (cfg.data.sources[1].train, cfg.data.sources[1].eval))


@pytest.mark.parametrize("overrides, message", [
    ({"data.train": "synthetic:arithmetic_other", "data.sources": [ARITH]},
     "'data.train': data.train and data.sources are mutually exclusive"),
    ({"data.eval": "synthetic:arithmetic", "data.sources": [ARITH]}, "'data.eval': with data.sources"),
    ({"data.sources": [{**ARITH, "name": "a/b"}]}, "'data.sources[0].name': 'a/b' is not a source name"),
    ({"data.sources": [{**ARITH, "name": "default"}]}, "'data.sources[0].name': 'default' is not a source name"),
    ({"data.sources": [ARITH, ARITH]}, "'data.sources[1].name': 'arith' is also data.sources[0]'s name"),
    ({"data.sources": [{**ARITH, "weight": 0}]}, "'data.sources.0.weight'"),
    ({"data.sources": [{**ARITH, "weight": -1}]}, "'data.sources.0.weight'"),
    ({"data.sources": [{**ARITH, "temperature": 1}]}, "unknown config key 'data.sources.0.temperature'"),
    ({"actors.reward": {"arith": "math_verify"}, "data.sources": [ARITH]},
     "'data.sources[0].reward': 'arithmetic' conflicts with 'actors.reward.arith': 'math_verify'"),
    ({"actors.reward": {"other": "arithmetic"}, "data.sources": [{"name": "s", "train": "synthetic:arithmetic"}]},
     "'data.sources[0].reward': source 's' has no reward"),
    ({"data.sources": [{**ARITH, "train": "/no/such/rows.jsonl"}]},
     "'data.sources[0].train': dataset file /no/such/rows.jsonl does not exist"),
    ({"data.sources": [{**ARITH, "eval": "/no/such/eval.jsonl"}]},
     "'data.sources[0].eval': dataset file /no/such/eval.jsonl does not exist"),
    ({"data.sources": [ARITH], "data.eval_every": 2}, "'data.eval_every'"),
    ({"data.sources": [{**ARITH, "reward": "no_such_builtin"}]}, "'actors.reward'"),
])
def test_bad_sources_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_a_source_inherits_data_settings_it_does_not_set():
    data = RunConfig().data.model_copy(update={"answer_key": "solution", "system_prompt": "Be brief.", "max_operand": 4})
    eff = effective_data(data, SourceConfig(name="s", train="rows.jsonl", answer_key="gold", max_operand=2,
                                            apply_chat_template=False, eval="held.jsonl"))
    assert (eff.train, eff.eval, eff.answer_key, eff.max_operand) == ("rows.jsonl", "held.jsonl", "gold", 2)
    assert (eff.system_prompt, eff.apply_chat_template, eff.prompt_key) == ("Be brief.", False, "prompt")


# ---- loading -----------------------------------------------------------------------------------------------
def test_sources_load_on_their_own_tagged_by_name_with_skips_per_source(tmp_path, tiny_model_dir):
    from actors.rewards import Rewards
    from launch.data import DataError
    from launch.run_data import prepare_prompts

    rows = [{"prompt": "1+2+3=", "gold": "6", "data_source": "theirs"}, {"prompt": "4+0+1=", "gold": "5"},
            {"prompt": "2+2+2="}]  # the last has no answer: skipped, counted against this source
    sums = _rows(tmp_path / "sums.jsonl", rows)
    held = _rows(tmp_path / "held.jsonl", [{"prompt": "3+3+1=", "gold": "7"}])
    cfg = load_config(None, {"model.path": tiny_model_dir, "data.max_operand": 2, "data.sources": [
        ARITH, {"name": "sums", "train": sums, "eval": held, "answer_key": "gold", "reward": "math_verify"}]})
    data = prepare_prompts(cfg, tiny_model_dir, Rewards(cfg.actors.reward))
    arith, summed = data.sources
    assert len(arith.train.prompts) == 9 and {p.data_source for p in arith.train.prompts} == {"arith"}
    assert [p.answer for p in summed.train.prompts] == ["6", "5"]  # its own answer_key
    assert {p.data_source for p in summed.train.prompts + summed.eval} == {"sums"}  # the name wins over the row's tag
    assert summed.train.skipped == {"missing_answer": 1} and arith.train.skipped == {}
    assert all(p.token_ids for p in summed.train.prompts + summed.eval)  # rendered
    assert len(data.train.prompts) == 11 and data.eval == summed.eval
    bad = _rows(tmp_path / "bad.jsonl", [{"prompt": "1+1="}])
    cfg = load_config(None, {"model.path": tiny_model_dir, "data.sources": [ARITH, {"name": "b", "train": bad}]})
    with pytest.raises(DataError, match=r"config key 'data.sources\[1\]' \(b\): prompt source .*bad.jsonl: no usable"):
        prepare_prompts(cfg, tiny_model_dir)


# ---- the weighted stream -----------------------------------------------------------------------------------
def test_draws_follow_the_weights_and_the_seed():
    sources = [("a", 3.0, _prompts("a", 5)), ("b", 1.0, _prompts("b", 7)), ("c", 0.5, _prompts("c", 3))]
    taken = MixtureStream(sources, seed=1).take(45_000)
    counts = Counter(p.data_source for p in taken)
    for name, weight in (("a", 3.0), ("b", 1.0), ("c", 0.5)):
        assert abs(counts[name] / len(taken) - weight / 4.5) < 0.01, counts
    again = MixtureStream(sources, seed=1).take(200)
    assert [p.id for p in again] == [p.id for p in taken[:200]]  # same seed, same sequence
    other = MixtureStream(sources, seed=2).take(200)
    assert [p.id for p in other] != [p.id for p in again]


def test_an_exhausted_source_starts_its_next_shuffled_epoch():
    stream = MixtureStream([("big", 1.0, _prompts("big", 50)), ("small", 1.0, _prompts("small", 3))], seed=0)
    small = [p.id for p in stream.take(400) if p.data_source == "small"]
    assert len(small) > 30
    epochs = [small[i:i + 3] for i in range(0, len(small) - len(small) % 3, 3)]
    assert all(sorted(e) == ["small-0", "small-1", "small-2"] for e in epochs)  # each epoch: every prompt once
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_a_restored_stream_continues_the_same_sequence():
    """The position goes through the launcher's checkpointed state (RunState.stream, JSON); a fresh stream
    restored from it draws exactly what the uninterrupted one draws next, across both sources' epochs."""
    sources = [("a", 2.0, _prompts("a", 4)), ("b", 1.0, _prompts("b", 6))]
    run = MixtureStream(sources, seed=5)
    run.take(37)
    state = RunState.from_json(json.loads(json.dumps(RunState(stream=run.state()).to_json())))
    expected = [p.id for p in run.take(80)]
    resumed = MixtureStream(sources, seed=5)
    resumed.restore(state.stream)
    assert [p.id for p in resumed.take(80)] == expected
    fresh = MixtureStream(sources, seed=5)  # the negative control: without the restore the order differs
    assert [p.id for p in fresh.take(80)] != expected
    with pytest.raises(ValueError, match=r"sources \['a', 'c'\].*data.sources names \['a', 'b'\]"):
        MixtureStream(sources, seed=5).restore({"draws": 1, "sources": {"a": {"epoch": 0, "index": 0},
                                                                        "c": {"epoch": 0, "index": 0}}})
    with pytest.raises(ValueError, match=r"for sources \['data.train'\]"):
        MixtureStream(sources, seed=5).restore({"epoch": 0, "index": 3})  # a data.train run's checkpoint


# ---- metrics and accounting --------------------------------------------------------------------------------
def test_learner_batch_metrics_per_source():
    import pyarrow as pa

    from buffer.testing import fake_batch
    from learner.batch import source_metrics

    table = pa.Table.from_batches([fake_batch(["g1", "g2", "g3"], group_size=4)])
    table = table.set_column(table.schema.get_field_index("data_source"), "data_source",
                             pa.array(["x"] * 8 + [""] * 4))
    rewards = table.column("reward").to_pylist()
    got = source_metrics(table.to_batches()[0])
    assert got == {"reward_mean/x": pytest.approx(sum(rewards[:8]) / 8), "groups/x": 2.0}  # untagged rows: none


def test_state_counts_per_source_and_survives_json():
    from actors.generator import GenerationResult

    state = RunState()
    state.new_request(_prompts("a", 3) + _prompts("b", 1))
    state.count(GenerationResult(None, 3, 0, 0, 0.0, 0.0, {"prompt_too_long": 1}, skipped_by_source={"b": 1}))
    assert state.dispatched_by_source == {"a": 3, "b": 1} and state.skipped_by_source == {"b": 1}
    restored = RunState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored.dispatched_by_source == state.dispatched_by_source and restored.skipped == {"prompt_too_long": 1}
    assert isinstance(restored.skipped_by_source, Counter)


def test_summary_per_source_reads_each_sources_own_reward_lines():
    from launch.data import PromptSet
    from launch.mixture import SourceData

    sources = [SourceData("a", 3.0, PromptSet(_prompts("a", 4), {"missing_answer": 2}), []),
               SourceData("b", 1.0, PromptSet(_prompts("b", 2)), _prompts("b", 1))]
    history = [{"step": i, "reward_mean/a": i / 10, **({"reward_mean/b": 1.0} if i % 2 else {})} for i in range(10)]
    out = source_summary(sources, history, Counter(a=30, b=10), Counter(a=2))
    assert out["a"]["reward_first"] == pytest.approx(0.05) and out["a"]["reward_last"] == pytest.approx(0.85)
    assert out["b"]["steps_with_source"] == 5 and out["b"]["reward_last"] == 1.0
    assert (out["a"]["groups_dispatched"], out["a"]["groups_skipped"], out["b"]["eval_prompts"]) == (30, 2, 1)
    assert out["a"]["skipped_at_load"] == {"missing_answer": 2}


# ---- end to end --------------------------------------------------------------------------------------------
HALF = """
def half(response, answer):
    # scores every response 0.25 or 0.5: never a value the arithmetic reward (0 or 1) gives
    return 0.5 if response.strip() == answer else 0.25
"""


@pytest.mark.slow
def test_a_two_source_run_scores_tags_and_reports_each_source(tmp_path, tiny_model_dir):
    """synthetic:arithmetic (exact match, 0 or 1) and a JSONL source with its own reward (0.25 or 0.5), drawn 1:1
    for 4 steps with held-out prompts for each: every stored row carries its source's name and a reward only its
    source's function gives; metrics.jsonl, TensorBoard, the eval lines, the checkpointed data position and
    summary.json report each source."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from buffer.rollout_log import read_log
    from launch.train import run

    (tmp_path / "half.py").write_text(HALF)
    pairs = [(a, b) for a in range(5) for b in range(5)]
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "data_source": "theirs"} for a, b in pairs[:20]]
    train = _rows(tmp_path / "half.jsonl", rows + [{"prompt": "1+1="}])  # no answer: skipped, counted for `half`
    held = _rows(tmp_path / "held.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs[20:]])
    sources = [{"name": "arith", "train": "synthetic:arithmetic", "reward": "arithmetic", "eval": held},
               {"name": "half", "train": train, "reward": f"{tmp_path / 'half.py'}:half", "eval": held}]
    cfg = load_config(None, {
        "model.path": tiny_model_dir, "data.max_operand": 4, "output_dir": str(tmp_path), "progress": False,
        "ray.num_cpus": 3, "actors.num_cpus": 1, "learner.num_cpus": 1, "data.sources": sources,
        "data.eval_every": 2, "learner.total_steps": 4, "learner.checkpoint_every": 2, "actors.n": 4,
        "actors.prompts_per_request": 8, "learner.groups_per_step": 8, "learner.micro_batch_groups": 8})
    run_dir = tmp_path / "run"
    summary = run(cfg, run_dir)

    log = read_log(str(run_dir / "rollouts")).to_pydict()
    by_source: dict[str, set] = {}
    for source, reward in zip(log["data_source"], log["reward"]):
        by_source.setdefault(source, set()).add(reward)
    assert set(by_source) == {"arith", "half"}, by_source.keys()  # the name wins over the rows' own "theirs"
    assert by_source["arith"] <= {0.0, 1.0} and by_source["half"] <= {0.25, 0.5}, by_source  # each its own reward

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps, evals = [r for r in lines if "reward_mean" in r], [r for r in lines if "eval/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r.get("groups/arith", 0) + r.get("groups/half", 0) == 8, r  # every group of the batch, by source
        assert 0.25 <= r.get("reward_mean/half", 0.25) <= 0.5 and 0 <= r.get("reward_mean/arith", 0) <= 1, r
        assert r["skipped_by_source/half"] == 1 and r["dispatched/arith"] + r["dispatched/half"] >= 8 * r["step"]
    assert any("reward_mean/arith" in r for r in steps) and any("reward_mean/half" in r for r in steps)
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # the same 5 held-out prompts under each source's reward: 0.25 + 0.05 k, and k / 5
        assert round((r["eval/reward_mean/half"] - 0.25) * 20, 6) in range(6), r
        assert round(r["eval/reward_mean/arith"] * 5, 6) in range(6), r
    tags = EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"]
    assert {"reward_mean/arith", "reward_mean/half", "eval/reward_mean/half", "dispatched/arith"} <= set(tags), tags

    # the run's prompt order is the stream's: from the start, and from the step-2 checkpoint's position on (one
    # actor serves requests in admission order, so the rollout log holds the groups in the order they were drawn)
    from launch.mixture import make_stream
    from launch.run_data import prepare_prompts

    drawn = [pid for pid, _ in dict.fromkeys(zip(log["prompt_id"], log["group_id"]))]
    assert summary["ledger"]["groups_skipped"] == 0 and len(drawn) == summary["ledger"]["groups_dispatched"]
    saved = json.loads((run_dir / "checkpoints" / "step-00000002" / "launcher.json").read_text())
    assert set(saved["stream"]["sources"]) == {"arith", "half"} and saved["stream"]["draws"] == saved["groups_dispatched"]
    data = prepare_prompts(cfg, tiny_model_dir)
    assert [p.id for p in make_stream(data.train, data.sources, cfg.data.seed).take(len(drawn))] == drawn
    resumed = make_stream(data.train, data.sources, cfg.data.seed)
    resumed.restore(saved["stream"])
    k = saved["groups_dispatched"]
    assert 0 < k < len(drawn) and [p.id for p in resumed.take(len(drawn) - k)] == drawn[k:]
    per = summary["sources"]
    assert per["half"]["groups_skipped"] == 1 and per["half"]["skipped_at_load"] == {"missing_answer": 1}
    assert per["arith"]["groups_dispatched"] + per["half"]["groups_dispatched"] == summary["ledger"]["groups_dispatched"]
    assert 0.25 <= per["half"]["reward_last"] <= 0.5 and summary["ledger"]["groups_lost"] == 0
