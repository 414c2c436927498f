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
