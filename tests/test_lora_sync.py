"""LoRA adapter-only weight sync (issue 20 parts 2 and 3): the learner publishes only the adapter, generators serve
it through vLLM's LoRA support, and a version is checked whole before it is served.

Fast tests: the config resolves `learner.lora.sync` (and refuses what cannot work, naming the keys), the whole-adapter
check against a base checkpoint, what the transports carry. Slow ones (one vLLM engine with LoRA enabled, a DeepSpeed
learner, in one process): vLLM's log-probs with the served adapter equal a transformers + PEFT forward of the
learner's adapter before and after updates; a damaged adapter leaves the old version served; the mismatch alarm is
quiet for an honest generator and trips for one that keeps a stale adapter."""
from __future__ import annotations

import pytest
import torch

from actors.adapters import AdapterError, base_shapes, check_whole, expected_tensors, read_dir, write_dir

LORA = {"rank": 4, "alpha": 16.0}


# ---- configuration --------------------------------------------------------------------------------------------
def _cfg(*overrides: str):
    from launch.config import load_config, parse_overrides

    return load_config(None, parse_overrides(["--learner.lora", "{rank: 4}", *overrides]))


def test_auto_sync_is_adapter_where_adapters_travel_and_merged_elsewhere():
    assert _cfg().learner.lora.sync == "adapter"  # object_store, between batches
    assert _cfg("--weights.transport", "disk").learner.lora.sync == "adapter"
    for other in (["--weights.transport", "shared_memory"], ["--weights.transport", "relay_cpu"],
                  ["--actors.weight_update_mode", "in_flight"]):
        assert _cfg(*other).learner.lora.sync == "merged", other
    assert _cfg("--learner.lora.sync", "merged").learner.lora.sync == "merged"


def test_adapter_sync_that_cannot_work_is_refused_naming_the_keys():
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match="'learner.lora.sync'.*weights.transport 'shared_memory'.*object_store or disk"):
        _cfg("--learner.lora.sync", "adapter", "--weights.transport", "shared_memory")
    with pytest.raises(ConfigError, match="'learner.lora.sync'.*actors.weight_update_mode in_flight"):
        _cfg("--learner.lora.sync", "adapter", "--actors.weight_update_mode", "in_flight")


def test_merge_flag_sets_merge_final_and_needs_lora():
    from launch.config import ConfigError
    from launch.train import parse_args

    _, cfg = parse_args(["--merge", "--learner.lora", "{rank: 4}"])
    assert cfg.learner.lora.merge_final and not _cfg().learner.lora.merge_final
    with pytest.raises(ConfigError, match="--merge.*learner.lora"):
        parse_args(["--merge"])


# ---- what a whole adapter is ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> str:
    from tests.micro_model import build_micro_model

    return build_micro_model(tmp_path_factory.mktemp("micro"))


def _peft_adapter(model_dir, tmp_path, target_modules="all-linear"):
    """An adapter as PEFT itself saves it, read back: the names and shapes the check must expect."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft")
    return read_dir(str(tmp_path / "peft"))


def test_the_check_expects_exactly_what_peft_saves_and_refuses_anything_else(micro_dir, tmp_path):
    tensors, config = _peft_adapter(micro_dir, tmp_path)
    expected = expected_tensors(base_shapes(micro_dir), config)
    assert len(expected) == 2 * 7 * 2  # A and B for the 7 projections of 2 layers (all-linear leaves out the head)
    check_whole(tensors, expected, "v1")  # PEFT's own file is whole

    name = next(n for n in tensors if "lora_B" in n)
    damaged = {
        "v1: .*1 missing": {n: t for n, t in tensors.items() if n != name},
        "v1: .*1 unexpected": {**tensors, name.replace("lora_B", "lora_C"): tensors[name]},
        "v1: .*1 misshapen": {**tensors, name: tensors[name][:-1]},
        "v1: 1 tensor.* not finite": {**tensors, name: torch.full_like(tensors[name], float("nan"))},
    }
    for reason, bad in damaged.items():
        with pytest.raises(AdapterError, match=reason):
            check_whole(bad, expected, "v1")
    with pytest.raises(AdapterError, match="target_modules"):
        expected_tensors(base_shapes(micro_dir), {**config, "target_modules": ["no_such_proj"]})

    path = write_dir(tmp_path / "copy", tensors, config)  # what a generator hands vLLM, and reads back
    again, config2 = read_dir(path)
    assert config2 == config and all(torch.equal(again[n], t) for n, t in tensors.items())
    (tmp_path / "copy" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)  # truncated: refused, not loaded
    with pytest.raises(AdapterError, match="cannot be read"):
        read_dir(path)


def test_disk_carries_adapters_to_a_receiver_and_full_weight_transports_refuse_them(micro_dir, tmp_path):
    from transport.cpu_push import CpuBucketPushTransport
    from transport.disk import DiskTransport
    from transport.registry import TRANSPORTS, transport_class

    assert {n for n in TRANSPORTS if transport_class(n).carries_adapters} == {"object_store", "disk"}
    tensors, config = _peft_adapter(micro_dir, tmp_path, ["q_proj", "v_proj"])
    disk = DiskTransport(str(tmp_path / "weights"))
    handle = disk.publish_adapter(3, tensors, config)
    assert handle.adapter == config and handle.nbytes == sum(t.nbytes for t in tensors.values())

    class Receiver:  # what a generator is to a transport (transport.base.WeightReceiver)
        id, version, got = "gen-test", 0, None

        def load_adapter(self, version, named_tensors, config):
            self.got = (version, dict(named_tensors), config)

        def load_weights(self, version, named_tensors):
            raise AssertionError("an adapter version was loaded as full weights")

    receiver = Receiver()
    disk.apply(handle, receiver, timeout_s=5)
    version, got, got_config = receiver.got
    assert version == 3 and got_config == config and set(got) == set(tensors)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    push = CpuBucketPushTransport(bucket_mb=1, timeout_s=5)
    with pytest.raises(ValueError, match="relay_cpu carries full weights only"):
        push.publish_adapter(1, tensors, config)
    push.close()


# ---- vLLM serving the learner's adapter ------------------------------------------------------------------------
PROMPTS = [("p0", "1+2=", "3"), ("p1", "3+1=", "4"), ("p2", "2+2=", "4"), ("p3", "4+0=", "4")]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    from actors.config import ActorConfig
    from actors.generator import Generator

    g = Generator(ActorConfig(n=4, max_tokens=6, temperature=0.8), tiny_model_dir, "gen-lora", max_model_len=64,
                  adapter_rank=LORA["rank"])
    yield g
    g.close()


@pytest.fixture(scope="module")
def learner(tiny_model_dir, dist_env):
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.objectives import ObjectiveConfig

    cfg = LearnerConfig(groups_per_step=4, micro_batch_groups=4, lr=3e-2, objective=ObjectiveConfig(max_len=6),
                        lora={**LORA, "sync": "adapter"})  # as a launched run resolves auto with these transports
    return Learner(cfg, tiny_model_dir, group_size=4, temperature=0.8)


def _prompts():
    from actors.generator import Prompt

    return [Prompt(*p) for p in PROMPTS]


def _batch(gen):
    """Whole groups from the engine, rewards 0/1 within each group so the update is not zero."""
    from buffer.schema import rollouts_from_arrow, rollouts_to_arrow

    rows = rollouts_from_arrow(gen.generate(_prompts()).batch)
    for i, r in enumerate(rows):
        r.reward = float(i % 2)
    return rollouts_to_arrow(rows)


def _peft_reference(model_dir, adapter_dir=None):
    """transformers + PEFT, built apart from the generator: the base model, with the adapter when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter_dir) if adapter_dir else model).eval()


def _worst(gen, model) -> float:
    from tests.test_generator import _check_match

    try:
        _check_match(gen, model, _prompts(), tol=0.0)
    except AssertionError as exc:
        return float(str(exc).split("transformers by ")[1].split()[0])
    return 0.0


def _served_ids(gen) -> set[int]:
    return gen.engine.llm.llm_engine.list_loras()



@pytest.mark.slow
def test_served_adapter_matches_peft_before_and_after_updates(gen, learner, tiny_model_dir, tmp_path):
    from learner import lora
    from tests.test_generator import _check_match
    from transport.disk import DiskTransport

    _check_match(gen, _peft_reference(tiny_model_dir), _prompts(), tol=1e-4)  # version 0: the base model alone
    disk = DiskTransport(str(tmp_path / "weights"))
    assert lora.sends_adapter(learner.cfg.lora, disk)
    served = []
    for version in (1, 3):
        while learner.step < version:
            learner.train_step(_batch(gen))
        handle, _ = learner.publish(disk)
        assert handle.version == version and handle.adapter["r"] == LORA["rank"]
        assert handle.nbytes < 0.2 * sum(p.numel() * 4 for p in learner.engine.module.parameters())  # adapter only
        disk.apply(handle, gen, timeout_s=10)
        assert gen.version == version and _served_ids(gen) == {version + 1}  # the old adapter was removed
        adapter_dir = learner.save_pretrained(str(tmp_path / f"final-{version}"), merge=False) + "/adapter"
        reference = _peft_reference(tiny_model_dir, adapter_dir)
        rows = _check_match(gen, reference, _prompts(), tol=1e-4)
        assert {r.policy_version for r in rows} == {version}
        served.append(reference)
    assert _worst(gen, served[0]) > 1e-3  # the two versions differ: the 1e-4 match has teeth
    assert _worst(gen, _peft_reference(tiny_model_dir)) > 1e-3  # and the adapter is really applied

    # a resumed run's generator loads the checkpoint's adapter (sync adapter: model/ holds no merged weights)
    model_dir = learner.save_pretrained(str(tmp_path / "ckpt-model"))
    assert not (tmp_path / "ckpt-model" / "model.safetensors").exists()
    gen.load_adapter_dir(7, model_dir + "/adapter")
    assert gen.version == 7 and _served_ids(gen) == {8}
    _check_match(gen, served[1], _prompts(), tol=1e-4)


@pytest.mark.slow
def test_a_damaged_adapter_leaves_the_old_version_served(gen, learner, tiny_model_dir, tmp_path):
    from learner import lora
    from tests.test_generator import _check_match
    from transport.disk import DiskTransport

    learner.train_step(_batch(gen))
    disk = DiskTransport(str(tmp_path / "weights"))
    good = learner.publish(disk)[0]
    disk.apply(good, gen, timeout_s=10)
    reference = _peft_reference(tiny_model_dir, learner.save_pretrained(str(tmp_path / "f"), merge=False) + "/adapter")
    served, ids = gen.version, _served_ids(gen)

    learner.train_step(_batch(gen))
    tensors = lora.peft_saved(learner.adapter_state())
    config = lora.peft_config(learner.engine.module)
    some = sorted(tensors)[5]
    for bad in ({n: t for n, t in tensors.items() if n != some},  # a tensor lost on the way
                {**tensors, some: tensors[some][:, :2]},  # cut short
                {**tensors, some: torch.full_like(tensors[some], float("inf"))}):
        with pytest.raises(AdapterError, match=f"generator gen-lora: adapter version {learner.step}"):
            gen.load_adapter(learner.step, iter(bad.items()), config)
        assert gen.version == served and _served_ids(gen) == ids
    handle = disk.publish_adapter(learner.step, tensors, config)
    with open(handle.payload, "r+b") as f:  # the file truncated on disk: the fetch fails before vLLM is touched
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(Exception, match="(?i)safetensor|header|incomplete"):
        disk.apply(handle, gen, timeout_s=5)
    assert gen.version == served and _served_ids(gen) == ids
    _check_match(gen, reference, _prompts(), tol=1e-4)  # still serving the old version, whole, not refusing


@pytest.mark.slow
def test_mismatch_alarm_is_quiet_under_adapter_sync_and_trips_on_a_stale_adapter(gen, learner, tmp_path):
    from learner.mismatch import judge
    from transport.disk import DiskTransport

    disk = DiskTransport(str(tmp_path / "weights"))
    disk.apply(learner.publish(disk)[0], gen, timeout_s=10)  # the generator serves the learner's own version
    learner.train_step(_batch(gen))
    honest = learner.mismatch["gen-lora"]
    assert honest["tokens"] > 0 and honest["abs_mean"] < 1e-4, honest
    for _ in range(3):  # the learner moves on; the generator keeps the adapter it has...
        learner.train_step(_batch(gen))
    gen.version = learner.step  # ...but labels its samples with the newest version
    learner.train_step(_batch(gen))
    stale = learner.mismatch["gen-lora"]
    assert stale["abs_mean"] > 100 * max(honest["abs_mean"], 1e-6), (honest, stale)
    assert [g for g, _ in judge(learner.mismatch, 1e-3, None, learner.step)] == ["gen-lora"]


# ---- what a new rollout actor is told --------------------------------------------------------------------------
def test_a_new_actor_starts_at_the_version_it_loads_and_resumed_adapter_runs_load_the_checkpoint_adapter(monkeypatch):
    """A replacement (or added) actor loads `serving_path`, the weights of version start_step; were it labelled with
    the newest handle's version, it would never load that handle and serve the start's weights under its number.
    With adapter sync it serves the base model, plus the checkpoint's adapter when resumed."""
    from launch import run_parts
    from launch.loop import Launcher
    from transport.base import WeightHandle

    made = []
    monkeypatch.setattr(run_parts, "make_rollout_actor", lambda *a, **kw: made.append(kw))
    parts = object.__new__(run_parts.RunParts)
    parts.buffer, parts.transport, parts.push_backend, parts.model_path = None, None, None, "/base"
    launcher = object.__new__(Launcher)
    launcher.parts, launcher.handle = parts, WeightHandle(9, "object_store", None, 0)
    for cfg, serving, start in ((_cfg(), "/base", 0), (_cfg("--learner.lora.sync", "merged"), "/ckpt/model", 4),
                                (_cfg(), "/ckpt/model", 4)):
        parts.cfg = cfg
        launcher.serving_path, launcher.start_step = serving, start
        launcher._new_actor("gen-0.r1", None)
        assert made[-1]["version"] == start and launcher.policy_version == 9
    assert [(m["model_path"], m["adapter_rank"], m["initial_adapter"]) for m in made] == [
        ("/base", 4, None), ("/ckpt/model", None, None), ("/base", 4, "/ckpt/model/adapter")]
