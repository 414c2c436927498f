"""The NCCL transport's CPU-testable parts, checked against vLLM's own code, and the push client's deadlines.

The broadcast itself needs CUDA and is not run here."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from transport.push import TimedClient
from transport.nccl import StateSource, nccl_buckets, run_with_deadline, update_info


def _state():
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(50, 16, generator=g)
    return {"model.embed_tokens.weight": embed, "model.layers.0.w": torch.randn(16, 16, generator=g).bfloat16(),
            "model.layers.0.b": torch.randn(16, generator=g), "model.norm.weight": torch.ones(16),
            "lm_head.weight": embed}


@pytest.mark.parametrize("bucket_bytes", [1, 600, 3300, 10**6])
def test_bucket_cut_matches_vllm_packed_broadcast(bucket_bytes):
    """vLLM's producer and consumer cut the packed stream with pack_tensors' rule; ours must agree."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    state = _state()
    it = iter(state.items())
    vllm_chunks = []
    while (chunk := pack_tensors(it, lambda item: item[1], bucket_bytes)) is not None:
        vllm_chunks.append(chunk.names)
        assert chunk.packed_tensor.numel() == sum(state[n].nbytes for n in chunk.names)
    ours = nccl_buckets(list(state), [t.nbytes for t in state.values()], bucket_bytes)
    assert ours == vllm_chunks
    assert 1 < len(ours) < len(state) or bucket_bytes in (1, 10**6)  # buckets, not one RPC per tensor


def test_state_source_satisfies_vllm_metadata_contract():
    """vLLM's trainer engine sizes every worker's receive buffers from metadata() and then sends iteration;
    its own check (the one send_weights runs) must accept our source, tied names included."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine, NCCLWeightTransferUpdateInfo

    source = StateSource(device="cpu")
    source.state = _state()
    meta = source.metadata()
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
    assert [n for n, _ in sent] == list(source.state) and "lm_head.weight" in dict(sent)
    info = update_info(source.state)
    typed = NCCLWeightTransferUpdateInfo(**info)  # the worker's parser accepts what the handle carries
    assert typed.dtype_names[1] == "bfloat16" and typed.shapes[0] == [50, 16]
    assert [getattr(torch, d) for d in typed.dtype_names] == [m.dtype for m in meta]


def test_nccl_without_cuda_is_a_clear_error(tmp_path):
    from transport.registry import make_transport

    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="'nccl' needs CUDA.*use 'object_store' or 'disk'"):
        make_transport("nccl", str(tmp_path), bucket_mb=64, timeout_s=5)


class _Peer:
    """A generator's weight-transfer surface: records calls; `stuck_in` blocks forever, `fail_in` raises."""

    def __init__(self, stuck_in: str = "", fail_in: str = ""):
        self.calls, self.stuck_in, self.fail_in = [], stuck_in, fail_in
        self.release = threading.Event()

    def _do(self, name, *args):
        self.calls.append((name, *args))
        if name == self.stuck_in:
            self.release.wait()
        if name == self.fail_in:
            raise ValueError("bad bucket")

    def init_weight_transfer_engine(self, info):
        self._do("init_weight_transfer_engine", info)

    def start_weight_update(self):
        self._do("start_weight_update")

    def update_weights(self, info):
        self._do("update_weights", info)

    def finish_weight_update(self, version):
        self._do("finish_weight_update", version)

    def apply_weight_update(self, info, version):
        self._do("apply_weight_update", info, version)


@pytest.mark.parametrize("atomic", [True, False])
def test_stuck_generator_times_out_naming_it_and_the_version(atomic):
    method = "apply_weight_update" if atomic else "update_weights"
    ok, stuck = _Peer(), _Peer(stuck_in=method)
    client = TimedClient({"gen-0": ok, "gen-1": stuck}, timeout_s=0.5, atomic=atomic)
    client.version = 7
    client.start_weight_update()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"weights version 7: {method} did not return within 0.5s on generator\(s\) gen-1$"):
        client.update_weights({"bucket": 0})
    assert time.monotonic() - t0 < 1.5
    stuck.release.set()
    client.finish_weight_update()
    expected = ([("apply_weight_update", {"bucket": 0}, "7")] if atomic else
                [("start_weight_update",), ("update_weights", {"bucket": 0}), ("finish_weight_update", "7")])
    assert ok.calls == expected  # atomic: one call per version, nothing a queued request could slip between


def test_failing_generator_is_named():
    client = TimedClient({"gen-0": _Peer(fail_in="start_weight_update")}, timeout_s=5, atomic=False)
    client.version = 3
    with pytest.raises(RuntimeError, match="weights version 3: start_weight_update failed on generator gen-0: bad bucket"):
        client.start_weight_update()


def test_stuck_broadcast_times_out():
    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="weights version 2: NCCL broadcast did not finish within 0.3s"):
        run_with_deadline(never.wait, 0.3, "weights version 2: NCCL broadcast")
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ZeroDivisionError):
        run_with_deadline(lambda: 1 / 0, 1.0, "x")


@pytest.mark.parametrize("workers", [1, 2])
def test_independent_generators_get_distinct_nccl_ranks(workers):
    """vLLM's trainer engine sends one worker init info (rank_offset=1) for one deployment; separate
    generators must each get their own block of ranks or they collide in the NCCL group."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

    peers = {f"gen-{i}": _Peer() for i in range(3)}
    client = TimedClient(peers, timeout_s=5, workers_per_generator=workers)
    world = 1 + workers * len(peers)
    client.init_weight_transfer_engine(worker_init_payload(NCCLWeightTransferInitInfo(
        master_address="10.0.0.1", master_port=29500, rank_offset=1, world_size=world)))
    infos = [p.calls[0][1] for p in peers.values()]
    ranks = [info["rank_offset"] + r for info in infos for r in range(workers)]
    assert sorted(ranks) == list(range(1, world))  # every rank but the trainer's 0, once
    assert all(info["world_size"] == world and info["master_port"] == 29500 for info in infos)
    for info in infos:
        NCCLWeightTransferInitInfo(**info)  # each is still a valid worker init info


def test_weight_sync_config_accepts_nccl_and_checks_bucket_size():
    from launch.config import ConfigError, load_config

    gpus = {"actors.num_gpus": 1, "learner.num_gpus": 1}  # nccl without GPUs is refused (tests/test_config.py)
    cfg = load_config(None, {"weights.transport": "nccl", "weights.bucket_mb": 64, **gpus})
    assert cfg.weights.transport == "nccl" and cfg.weights.bucket_mb == 64
    with pytest.raises(ConfigError, match="'weights.bucket_mb'"):
        load_config(None, {"weights.bucket_mb": 0})
    with pytest.raises(ConfigError, match="'weights.transport'"):
        load_config(None, {"weights.transport": "gloo"})
