"""vLLM on CPU with linear weights kept in PyTorch layout, so a new version loads as an in-place copy.

Why not vLLM's default: its CPU backend repacks every linear weight into oneDNN's blocked layout once the model
is loaded and frees the original (`dispatch_cpu_unquantized_gemm`). A live update then has to go through vLLM's
layerwise reload, which re-creates each layer's parameters, loads them and repacks them; the repack alone costs
6-10x a copy of the same bytes (`create_onednn_mm` against `copy_`, one thread), and the whole reload took 0.3-0.8 s
for a 100M-parameter model whose bytes copy in ~60 ms.

With `actors.cpu_weight_layout: plain` the parameters stay where the model's own `load_weights` writes them (q/k/v
and gate/up into their fused slices), so an update is a copy into the memory the next forward reads, or, from a
shared-memory slot, no copy at all (`point_at`). How a layer multiplies by that weight:

- eager engines (the CPU default): oneDNN on the live weight, reordered inside each call
  (`torch.ops.mkldnn._linear_pointwise`), for a version's first `PACK_AFTER_CALLS` calls; from then on, vLLM's own
  packed matmul (`create_onednn_mm` / `onednn_mm`, what its default layout runs) over a packed copy of the weight,
  until the next load. Renting before buying: a pack costs about what `PACK_AFTER_CALLS` reordering calls cost
  over packed ones (one thread, fp32: ~0.15 ms to pack a tiny layer against ~10 us a call at decode; 2.2 ms
  against ~0.3 ms for a 0.5B MLP: `python -m benchmarks.plain_linear`), so a version that is replaced after one
  short request (the default job: a load every request, ~9 forward passes) never pays for a pack, and one that
  serves long responses runs at vLLM's packed speed after a few steps. The worst case, a version replaced just
  after its pack, pays both. Memory: a packed layer holds its weight twice (the parameter and the packed copy).
- compiled engines (`actors.enforce_eager: false`): vLLM compiles the forward once and skips guards, so a copy made
  at trace time would be baked in; these multiply through oneDNN on the live weight each call
  (`torch.ops.mkldnn._linear_pointwise`; `F.linear`, vLLM's own fallback, where torch has no oneDNN path for the
  dtype).

`benchmarks.rollout` has the end-to-end comparison. GPUs are untouched.
"""
from __future__ import annotations

import torch

_packed_dispatch = None  # vLLM's own dispatch, kept for the layers this does not handle and for layout "packed"
_plain = False  # the layout the engine this process builds (or reloads) next uses
_loads = 0  # versions this process's engine has taken (copy_into, point_at): a packed copy made before the last is stale


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def plain_matmul(dtype: torch.dtype):
    """The matmul for a plain weight: oneDNN on the live weight where torch has it for the dtype (fp32 on this AMD
    CPU: 1.7-3.5x faster than `F.linear`, whose MKL sgemm takes a slow path here; bf16: as fast, `F.linear` already
    goes through oneDNN), else `F.linear`."""
    bf16_ok = dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16) and bf16_ok:
        return _onednn_linear
    return torch.nn.functional.linear


PACK_AFTER_CALLS = 16  # calls of one version before a layer packs its weight (the module docstring says why)


class LazyPacked:
    """A plain layer's matmul in an eager engine (called as `cpu_linear(x, layer.weight, bias)`, as vLLM's own are):
    per-call oneDNN on the live weight for a version's first `PACK_AFTER_CALLS` calls, then vLLM's packed matmul
    over a copy packed from it. A load (`_loads` moves) drops the copy."""

    def __init__(self, per_call):
        from vllm import _custom_ops as ops

        self.per_call, self.ops = per_call, ops
        self.loads, self.calls, self.handle = _loads, 0, None

    def packed(self) -> bool:
        """Whether the next call multiplies by a packed copy of the version now loaded."""
        return self.handle is not None and self.loads == _loads

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.loads != _loads:  # a new version: free the old copy (the weight twice, not three times)
            self.loads, self.calls, self.handle = _loads, 0, None
        if self.handle is None:
            if self.calls < PACK_AFTER_CALLS:
                self.calls += 1
                return self.per_call(x, weight, bias)
            self.handle = self.ops.create_onednn_mm(weight.t(), 32)
        return self.ops.onednn_mm(self.handle, x, bias)


def _eager() -> bool:
    from vllm.config import CompilationMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return config is not None and config.compilation_config.mode == CompilationMode.NONE


def _dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
    from vllm import _custom_ops as ops

    weight = layer.weight
    if not _plain or weight.is_meta or weight.ndim != 2:  # packed; missing layers, conv and MoE expert weights
        return _packed_dispatch(layer, remove_weight)
    if ops._supports_onednn and weight.dtype in (torch.float32, torch.bfloat16) and _eager():
        layer.cpu_linear = LazyPacked(plain_matmul(weight.dtype))
    else:  # reads the live weight at each call
        layer.cpu_linear = plain_matmul(weight.dtype)


def set_cpu_weight_layout(layout: str) -> None:
    """Choose how vLLM's CPU backend holds linear weights in this process from now on ("plain" or "packed"); call
    before the engine loads the model (vLLM imports its dispatch function at each call, so patching its module is
    enough). One engine per process, as in a rollout actor."""
    global _packed_dispatch, _plain
    from vllm.model_executor.layers import utils

    if _packed_dispatch is None:
        _packed_dispatch = utils.dispatch_cpu_unquantized_gemm
        utils.dispatch_cpu_unquantized_gemm = _dispatch
    _plain = layout == "plain"


def active() -> bool:
    """Whether this process's vLLM keeps linear weights plain (and so can be updated by `copy_into`)."""
    return _plain


def copy_into(model: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Copy a whole version (checkpoint names) into a vLLM model's parameters; returns the parameters written.
    Raises naming parameters the version did not cover: the model then holds a mix and must not serve."""
    global _loads
    _loads += 1  # before the first byte moves: a failed load must not leave an old packed copy serving
    with torch.inference_mode():
        loaded = model.load_weights(iter(tensors))
    if loaded is None:  # a model that does not report what it loaded
        return len(tensors)
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        raise ValueError(f"the new weights did not cover {len(missing)} parameter(s) of the served model, "
                         f"e.g. {missing[:3]}: the engine now holds a mix and must not serve")
    return len(loaded)


def load_in_place(worker, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """`copy_into` on the model of a vLLM worker; called through `LLM.collective_rpc`."""
    return copy_into(worker.model_runner.get_model(), tensors)


def point_at(worker, views: list[tuple[str, torch.Tensor]]) -> int:
    """Make a vLLM worker's parameters views of `views` ({vLLM parameter name: tensor}, e.g. a shared-memory slot):
    nothing is copied. Every parameter must be given with its shape and dtype, checked before any is changed."""
    params = dict(worker.model_runner.get_model().named_parameters())
    given = dict(views)
    if missing := sorted(set(params) - set(given)):
        raise ValueError(f"the new weights do not cover {len(missing)} parameter(s) of the served model, e.g. {missing[:3]}")
    for name, p in params.items():
        t = given[name]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"{name}: the new weights are {tuple(t.shape)} {t.dtype}, the model holds {tuple(p.shape)} {p.dtype}")
    global _loads
    _loads += 1
    for name, p in params.items():
        p.data = given[name]
    return len(params)


def layout_of(worker, checkpoint) -> dict:
    """The shared-memory slot layout of a vLLM worker's model, checked against the checkpoint it loaded."""
    from transport.shared_slots import vllm_layout

    return vllm_layout(worker.model_runner.get_model(), checkpoint)
