"""The plain CPU weight layout's matmul, without an engine: which matmul a layer gets (eager or compiled), and a
lazily packed layer's numbers before its pack, after it, and after a load (tests/test_weight_sync.py and
tests/test_shared_slots.py check the same through a real vLLM engine)."""
from __future__ import annotations

import types

import pytest
import torch

from transport import plain_weights


@pytest.fixture
def plain_layout():
    """This process's vLLM dispatch set to the plain layout, and back to what it was after the test (engines built
    later in the same pytest process set their own)."""
    was = plain_weights.active()
    plain_weights.set_cpu_weight_layout("plain")
    yield
    plain_weights.set_cpu_weight_layout("plain" if was else "packed")


def _layer(out_features: int = 48, in_features: int = 32, seed: int = 0) -> torch.nn.Module:
    layer = torch.nn.Module()
    g = torch.Generator().manual_seed(seed)
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g), requires_grad=False)
    return layer


def _dispatched(mode) -> torch.nn.Module:
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import utils

    layer = _layer()
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(mode=mode))):
        utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return layer


def test_eager_engines_pack_lazily_and_compiled_ones_read_the_live_weight(plain_layout):
    """A compiled forward is traced once with guards skipped: a packed copy made at trace time would outlive the
    next load, so only eager engines may hold one. Either way the parameter stays (a load copies into it)."""
    from vllm.config import CompilationMode

    eager, compiled = _dispatched(CompilationMode.NONE), _dispatched(CompilationMode.VLLM_COMPILE)
    assert isinstance(eager.cpu_linear, plain_weights.LazyPacked)
    assert compiled.cpu_linear is plain_weights.plain_matmul(torch.float32)
    assert eager.weight.shape == compiled.weight.shape == (48, 32)


def _fake_worker(layer: torch.nn.Module):
    """What `point_at` reads of a vLLM worker: its model's parameters."""
    model = torch.nn.Module()
    model.proj = layer
    return types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))


def test_a_lazily_packed_layer_multiplies_by_the_version_now_loaded(plain_layout):
    from vllm.config import CompilationMode

    layer = _dispatched(CompilationMode.NONE)
    matmul, x = layer.cpu_linear, torch.randn(5, 32)
    calls = plain_weights.PACK_AFTER_CALLS
    for i in range(calls + 2):  # the per-call path first, then the packed copy
        assert matmul.packed() == (i > calls), i
        out = matmul(x, layer.weight, None)
        assert torch.allclose(out, torch.nn.functional.linear(x, layer.weight), atol=1e-5), i
    assert matmul.packed()

    new = _layer(seed=1).weight.data
    plain_weights.point_at(_fake_worker(layer), [("proj.weight", new)])  # a new version: the copy is stale
    assert not matmul.packed()
    for i in range(calls + 2):
        out = matmul(x, layer.weight, None)
        assert torch.allclose(out, torch.nn.functional.linear(x, new), atol=1e-5), f"call {i} after the load"
    assert matmul.packed()
