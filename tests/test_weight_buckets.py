"""Bucketing of weights for transfer: plan, pack, unpack (pure, fast)."""
from __future__ import annotations

import pytest
import torch

from transport.buckets import pack_bucket, pack_state, plan_buckets, plan_for_state, unpack_bucket, unpack_state


def _state():
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(64, 32, generator=g)
    return {
        "model.embed_tokens.weight": embed,
        "model.layers.0.w": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.b": torch.randn(32, generator=g),
        "model.layers.1.w": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g),
        "lm_head.weight": embed,  # tied: the same storage under a second name
    }


def _roundtrip(state, bucket_bytes):
    plan, bufs = pack_state(state, bucket_bytes)
    return plan, dict(unpack_state(plan, bufs))


def test_roundtrip_is_bit_exact_with_bf16_and_tied_tensors():
    state = _state()
    plan, got = _roundtrip(state, bucket_bytes=4096)
    assert list(got) == [n for b in plan for n in (m.name for m in b.tensors)]
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name  # bitwise
    # tied names arrive as two independent tensors with the same values (vLLM reloads each name)
    assert got["lm_head.weight"].data_ptr() != got["model.embed_tokens.weight"].data_ptr()


def test_buckets_are_single_dtype_and_bounded():
    state = _state()
    plan = plan_for_state(state, bucket_bytes=4096)
    for b in plan:
        assert {m.dtype for m in b.tensors} == {b.dtype}
        assert b.nbytes == sum(m.nbytes for m in b.tensors)
        offsets = [m.offset for m in b.tensors]
        assert offsets == sorted(offsets) and offsets[0] == 0
        # a bucket only exceeds the bound when it holds one tensor that alone is bigger
        assert b.nbytes <= 4096 or len(b.tensors) == 1
    assert {b.dtype for b in plan} == {"float32", "bfloat16"}
    assert [b.index for b in plan] == list(range(len(plan)))


def test_tensor_bigger_than_a_bucket_travels_alone():
    state = {"small": torch.ones(4), "big": torch.arange(1000, dtype=torch.float32), "small2": torch.zeros(4)}
    plan, got = _roundtrip(state, bucket_bytes=64)
    big = [b for b in plan if any(m.name == "big" for m in b.tensors)]
    assert len(big) == 1 and len(big[0].tensors) == 1 and big[0].nbytes == 4000
    assert torch.equal(got["big"], state["big"]) and torch.equal(got["small2"], state["small2"])
    assert len(plan) == 3  # the big one closes the first bucket and is closed by the next


def test_one_big_bucket_holds_everything_of_a_dtype():
    plan = plan_for_state(_state(), bucket_bytes=1 << 30)
    assert len(plan) == 2


def test_empty_state():
    plan, bufs = pack_state({}, 1024)
    assert plan == [] and bufs == [] and list(unpack_state(plan, bufs)) == []


def test_non_contiguous_and_scalar_tensors():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    state = {"t": t, "scalar": torch.tensor(3.5)}
    _, got = _roundtrip(state, 1024)
    assert torch.equal(got["t"], t) and got["scalar"].shape == () and float(got["scalar"]) == 3.5


def test_unpacked_views_alias_the_buffer_only_when_asked():
    state = {"a": torch.ones(4)}
    plan, bufs = pack_state(state, 1024)
    view = dict(unpack_bucket(bufs[0], plan[0], copy=False))["a"]
    copy = dict(unpack_bucket(bufs[0], plan[0]))["a"]
    bufs[0].zero_()
    assert float(view.sum()) == 0.0 and float(copy.sum()) == 4.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], 0)
    with pytest.raises(ValueError, match="'x' appears twice"):
        plan_buckets([("x", torch.float32, (1,)), ("x", torch.float32, (1,))], 16)
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        plan_buckets([("x", "float99", (1,))], 16)
    plan = plan_for_state({"w": torch.zeros(2, 2)}, 1024)
    with pytest.raises(ValueError, match="'w' is float32 \\(3,\\)"):
        pack_bucket({"w": torch.zeros(3)}, plan[0])
    with pytest.raises(KeyError, match="'w'"):
        pack_bucket({}, plan[0])
    with pytest.raises(ValueError, match="2 bucket buffers for a plan of 1"):
        list(unpack_state(plan, [torch.zeros(16, dtype=torch.uint8)] * 2))
    with pytest.raises(ValueError, match="flat uint8"):
        unpack_bucket(torch.zeros(16), plan[0])
