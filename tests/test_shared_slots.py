"""Shared-memory slots: the learner writes a version in vLLM's own layout, the generator serves it without a copy.

A real vLLM engine (tiny model, tied embeddings) and real DeepSpeed learners. Proofs: the layout is checked
against what vLLM loaded; after an update the generator's parameters live in the slot and its log-probs equal
a transformers forward pass with the learner's weights (ZeRO 0 and 3); a slot a generator serves is never
rewritten; a handle whose slot was meanwhile rewritten serves the newer whole version; an unfinished write is
refused and a writer that never lets go times out naming the slot.
"""
from __future__ import annotations

import gc
import json
import os
import time

import pytest

from tests.test_weight_sync import _hf, _packed_layers, _perturbed, _prompts, _train_batch, serve_until_packed
from tests.test_generator import _check_match
from transport.shared_slots import LayoutError, SharedSlotTransport, Slot, vllm_layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from actors.config import ActorConfig
    from actors.generator import Generator

    cfg = ActorConfig(n=4, max_tokens=6, temperature=0.8, top_k=0, enable_prefix_caching=True)
    gen = Generator(cfg, tiny_model_dir, "gen-s", max_model_len=64, engine_kwargs={"block_size": 32})
    yield gen
    del gen  # torn down now, not whenever the garbage collector runs (vLLM's teardown destroys the process group)
    gc.collect()


@pytest.fixture()
def slots(generator, tmp_path):
    """A learner-side and a generator-side transport on one slot directory (two processes' views of it)."""
    learner_side = SharedSlotTransport(str(tmp_path / "slots"))
    generator_side = SharedSlotTransport(learner_side.dir)
    generator_side.attach(generator)
    return learner_side, generator_side


def _model(generator):
    return generator.engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()


def _slot_files(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith("slot-"))


def test_layout_is_vllms_own_and_checked_against_what_it_loaded(generator, tiny_model_dir):
    layout = generator.weight_layout()
    regions = {r["name"]: r for r in layout["regions"]}
    qkv = regions["model.layers.0.self_attn.qkv_proj.weight"]
    assert [p[0].rsplit(".", 2)[1] for p in qkv["parts"]] == ["q_proj", "k_proj", "v_proj"]
    assert [p[1] for p in qkv["parts"]] == [0, qkv["parts"][0][2], qkv["parts"][0][2] + qkv["parts"][1][2]]
    embed = regions["model.embed_tokens.weight"]  # vLLM pads the vocabulary: the slot keeps the padding rows
    assert embed["shape"][0] > embed["parts"][0][2]
    assert "lm_head.weight" not in regions  # tied: one parameter, served from the embedding's region
    assert set(regions) == {n for n, _ in _model(generator).named_parameters()}

    ckpt = _hf(tiny_model_dir).state_dict()
    ckpt["model.layers.1.mlp.up_proj.weight"] = ckpt["model.layers.1.mlp.up_proj.weight"] + 1e-3
    with pytest.raises(LayoutError, match=r"gate_up_proj.weight: rows \d+\.\.\d+ do not hold model.layers.1.mlp.up_proj"):
        vllm_layout(_model(generator), ckpt)
    with pytest.raises(LayoutError, match="has no tensor model.norm.weight"):
        vllm_layout(_model(generator), {k: v for k, v in _hf(tiny_model_dir).state_dict().items() if k != "model.norm.weight"})


@pytest.mark.parametrize("stage", [0, 3])
def test_generator_serves_the_learners_weights_from_the_slot(stage, generator, slots, tiny_model_dir, dist_env):
    from learner.config import LearnerConfig
    from learner.objectives import ObjectiveConfig
    from learner.learner import Learner

    learner_side, generator_side = slots
    cfg = LearnerConfig(zero_stage=stage, zero3_persistence_threshold=0 if stage == 3 else None, groups_per_step=2,
                        micro_batch_groups=2, lr=3e-2, objective=ObjectiveConfig(max_len=6))
    learner = Learner(cfg, tiny_model_dir, group_size=4, temperature=0.8)
    for _ in range(2):
        learner.train_step(_train_batch(generator))
    state = learner.full_state()
    version = generator.version + 1
    handle = learner_side.publish(version, state)
    generator_side.apply(handle, generator, timeout_s=10)
    assert generator.version == version
    slot = generator_side._held
    lo, hi = slot.buf.data_ptr(), slot.buf.data_ptr() + slot.nbytes
    assert all(lo <= p.data_ptr() < hi for p in _model(generator).parameters()), "served from private memory"
    rows = _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)
    assert {r.policy_version for r in rows} == {version}
    with pytest.raises(RuntimeError, match="serves its weights from a shared-memory slot"):
        generator.load_weights(version + 1, iter(state.items()))  # a copy would write into the shared slot


def test_a_served_slot_is_never_rewritten_and_is_freed_once_left(generator, slots, tiny_model_dir):
    learner_side, generator_side = slots
    base = generator.version
    states = {v: _perturbed(tiny_model_dir, seed=v) for v in range(base + 1, base + 5)}
    generator_side.apply(learner_side.publish(base + 1, states[base + 1]), generator, timeout_s=10)
    served = generator_side._held.path
    for v in range(base + 2, base + 5):  # the generator stays on base+1 while three more versions are written
        assert learner_side.publish(v, states[v]).payload["path"] != served
    _check_match(generator, _hf(tiny_model_dir, states[base + 1]), _prompts(), tol=1e-4)
    assert len(_slot_files(learner_side.dir)) == 3  # the served one + two alternating: slots are reused

    serve_until_packed(generator)  # packed copies of base+1, which pointing the parameters elsewhere must drop
    handle = learner_side.publish(base + 5, states[base + 4])
    generator_side.apply(handle, generator, timeout_s=10)
    assert generator.version == base + 5 and generator_side._held.path == handle.payload["path"]
    assert generator.engine.llm.collective_rpc(_packed_layers)[0][0] == 0
    _check_match(generator, _hf(tiny_model_dir, states[base + 4]), _prompts(), tol=1e-4)
    old = Slot(served, generator.weight_layout()["nbytes"])
    assert old.try_lock(exclusive=True), "the slot left behind is still locked"
    old.unlock()


def test_a_handle_whose_slot_was_rewritten_serves_the_newer_version(generator, slots, tiny_model_dir):
    learner_side, generator_side = slots
    base = generator.version
    states = {v: _perturbed(tiny_model_dir, seed=10 + v - base) for v in (base + 1, base + 2, base + 3)}
    first = learner_side.publish(base + 1, states[base + 1])
    learner_side.publish(base + 2, states[base + 2])
    third = learner_side.publish(base + 3, states[base + 3])  # the first slot was free again: rewritten
    assert third.payload["path"] == first.payload["path"]
    generator_side.apply(first, generator, timeout_s=10)
    assert generator.version == base + 3
    _check_match(generator, _hf(tiny_model_dir, states[base + 3]), _prompts(), tol=1e-4)


def test_unfinished_write_is_refused_and_a_stuck_writer_times_out(generator, slots, tiny_model_dir):
    learner_side, generator_side = slots
    base = generator.version
    state = _perturbed(tiny_model_dir, seed=99)
    generator_side.apply(learner_side.publish(base + 1, state), generator, timeout_s=10)

    handle = learner_side.publish(base + 2, _perturbed(tiny_model_dir, seed=98))
    crashed = learner_side._slots[handle.payload["path"]]
    crashed.set_header(base + 2, False, generator.weight_layout()["id"])  # as left by a learner that died mid-write
    with pytest.raises(RuntimeError, match=f"slot .*slot-\\d+.bin holds an unfinished write \\(version {base + 2}\\)"):
        generator_side.apply(handle, generator, timeout_s=10)
    assert generator.version == base + 1
    _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)

    crashed.set_header(base + 2, True, generator.weight_layout()["id"])
    assert crashed.try_lock(exclusive=True)  # a writer that never lets go
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"weights version {base + 2}: slot .*slot-\\d+.bin stayed locked by a writer for 0.5s"):
        generator_side.apply(handle, generator, timeout_s=0.5)
    assert time.monotonic() - t0 < 5 and generator.version == base + 1
    crashed.unlock()
    generator_side.apply(handle, generator, timeout_s=10)
    assert generator.version == base + 2


def test_learner_errors_name_what_is_missing(generator, tmp_path, tiny_model_dir):
    lonely = SharedSlotTransport(str(tmp_path / "nobody"))
    with pytest.raises(LayoutError, match="no generator registered a layout"):
        lonely.publish(1, _hf(tiny_model_dir).state_dict())
    learner_side = SharedSlotTransport(str(tmp_path / "slots"))
    SharedSlotTransport(learner_side.dir).attach(generator)
    state = _hf(tiny_model_dir).state_dict()
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="has no model.layers.0.self_attn.k_proj.weight, which the generators serve in "
                                       "model.layers.0.self_attn.qkv_proj.weight"):
        learner_side.publish(1, state)
    other = dict(generator.weight_layout(), id="0" * 40)
    with pytest.raises(LayoutError, match="differs from the one registered"):
        SharedSlotTransport(learner_side.dir).register_layout(other)
    assert json.loads((tmp_path / "slots" / "layout.json").read_text())["id"] == generator.weight_layout()["id"]
