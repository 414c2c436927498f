"""Shared fixtures: the tiny model is built once per session (tokenizer trained here, short warm start)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from launch.config import ModelConfig
    from launch.model import build_default_model

    return build_default_model(ModelConfig(warm_start_steps=30), max_operand=4, cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dist_env():
    """torch.distributed settings for an in-process learner. vLLM tears its engine down with
    `torch.distributed.destroy_process_group()`, which DeepSpeed does not hear of: an engine of an earlier module
    (collected whenever the garbage collector gets to it) leaves DeepSpeed's cached world group pointing into a
    destroyed process group. Collect now, then drop DeepSpeed's stale references (its own release function)."""
    import gc

    import torch.distributed as dist
    from deepspeed.utils import groups

    from learner.actor import free_port

    gc.collect()
    stale = groups._WORLD_GROUP is not None and (
        not dist.is_initialized() or groups._WORLD_GROUP not in dist.distributed_c10d._world.pg_group_ranks)
    if stale:
        groups._release_process_group_references(None)
    port = free_port()  # outside the ephemeral range, which any connection may take a port from meanwhile
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


@pytest.fixture(scope="session")
def tiny_judges(tmp_path_factory) -> dict[str, str]:
    """The tiny scalar and preference judges of synthetic:arithmetic with operands up to 4 (launch/judges.py),
    built once per session (seconds each): for the reward-model service's tests and the examples'."""
    from launch.judges import KINDS, JudgeRecipe, build_tiny_judge

    cache = tmp_path_factory.mktemp("judges")
    return {kind: build_tiny_judge(kind, cache, JudgeRecipe(max_operand=4)) for kind in KINDS}
