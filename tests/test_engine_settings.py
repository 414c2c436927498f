"""Engine settings for real hardware, without starting an engine: dtype and CUDA graphs resolved by device, tensor
parallelism in the engine arguments, stop strings in the sampling params, the context length read from the model,
and the checks that refuse what cannot run before any actor starts."""
from __future__ import annotations

import json

import pytest

from actors.config import ActorConfig
from launch.config import ConfigError, load_config


def _args(**kw) -> dict:
    from actors.engines import engine_args

    return engine_args(ActorConfig(**kw), "/model", "gen-0", max_model_len=512)


def test_auto_dtype_and_eager_follow_the_device():
    cpu, gpu = _args(), _args(num_gpus=1)
    assert (cpu["dtype"], cpu["enforce_eager"]) == ("float32", True)  # CPU: fp32 (1e-4 log-prob checks), no graphs
    assert (gpu["dtype"], gpu["enforce_eager"]) == ("bfloat16", False)  # GPU: bf16 and CUDA graphs
    explicit = _args(num_gpus=1, dtype="float16", enforce_eager=True)
    assert (explicit["dtype"], explicit["enforce_eager"]) == ("float16", True)
    assert _args(dtype="bfloat16", enforce_eager=False)["dtype"] == "bfloat16"
    assert _args(gpu_memory_utilization=0.9)["gpu_memory_utilization"] == 0.9
    assert cpu["max_model_len"] == 512 and cpu["logprobs_mode"] == "processed_logprobs"


def test_enforce_eager_parses_from_yaml_and_cli():
    assert load_config(None, {"actors.enforce_eager": True}).actors.enforce_eager is True
    assert load_config(None, {"actors.enforce_eager": "auto"}).actors.enforce_eager == "auto"
    with pytest.raises(ConfigError, match="'actors.enforce_eager'"):
        load_config(None, {"actors.enforce_eager": "sometimes"})
    with pytest.raises(ConfigError, match="'actors.dtype'"):
        load_config(None, {"actors.dtype": "int8"})


def test_tensor_parallel_engine_args():
    """tp=1 leaves vLLM's defaults (one in-process worker, as before); tp>1 asks for vLLM's Ray executor, whose
    workers take the GPU bundles of the actor's placement group."""
    one = _args(num_gpus=1)
    assert "tensor_parallel_size" not in one and "distributed_executor_backend" not in one
    two = _args(num_gpus=1, tensor_parallel_size=2)
    assert two["tensor_parallel_size"] == 2 and two["distributed_executor_backend"] == "ray"


def test_stop_strings_and_ids_reach_the_sampling_params():
    from actors.generator import Generator

    gen = Generator.__new__(Generator)  # sampling_params reads only cfg: no engine needed
    gen.cfg = ActorConfig(stop=["</answer>", "\n\n"], stop_token_ids=[7, 9], max_tokens=32)
    params = gen.sampling_params()
    assert params.stop == ["</answer>", "\n\n"] and params.stop_token_ids == [7, 9]
    assert params.include_stop_str_in_output  # the text keeps what the recorded tokens spell
    assert params.max_tokens == 32 and params.logprobs == 0
    gen.cfg = ActorConfig()
    assert not gen.sampling_params().stop and not gen.sampling_params().stop_token_ids


def test_sampled_logprobs_read_either_of_vllms_layouts_alike():
    """The behaviour log-prob of each sampled token, from vLLM's flat layout (read as one list) or its per-position
    dicts; a flat container holding more than the sampled entries is read position by position."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from actors.engines import sampled_logprobs

    ids, values = [5, 3, 5], [-0.25, -1.5, -0.125]
    per_position = [{tok: Logprob(v, 1)} for tok, v in zip(ids, values)]
    flat = FlatLogprobs()
    flat.extend(per_position)
    assert sampled_logprobs(ids, per_position) == values and sampled_logprobs(ids, flat) == values
    wider = FlatLogprobs()  # top-2 at each position, the sampled token listed second
    wider.extend([{9: Logprob(-0.01, 1), tok: Logprob(v, 2)} for tok, v in zip(ids, values)])
    assert sampled_logprobs(ids, wider) == values


@pytest.mark.parametrize("overrides, message", [
    ({"actors.tensor_parallel_size": 2}, r"'actors.tensor_parallel_size': 2 needs GPUs.*actors.num_gpus is 0"),
    ({"actors.tensor_parallel_size": 2, "actors.num_gpus": 0.5}, r"'actors.num_gpus': 0.5 .* set actors.num_gpus 1"),
    ({"actors.max_tokens": 64}, r"'actors.max_tokens': 64 leaves no room for a prompt in model.max_model_len=64"),
    ({"actors.max_tokens": 600, "model.max_model_len": 512}, r"'actors.max_tokens': 600"),
])
def test_engine_settings_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_tensor_parallel_on_gpus_is_accepted_and_shown_by_dry_run(capsys):
    import yaml

    from launch.train import main

    assert main(["--dry-run", "--actors.num_gpus", "1", "--actors.tensor_parallel_size", "2",
                 "--actors.num_actors", "3", "--actors.max_tokens", "16"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["engine"] == {"dtype": "bfloat16", "enforce_eager": False, "tensor_parallel_size": 2,
                             "gpus_per_actor": 2, "max_model_len": 64, "max_tokens": 16,
                             "gpu_memory_utilization": 0.5, "stop": [], "stop_token_ids": []}
    rollout = {r["actor"]: r for r in out["placement"]}["rollout"]
    assert rollout["count"] == 3 and rollout["num_gpus"] == 2


@pytest.fixture
def model_dir(tmp_path):
    """A model directory holding only config.json: all the driver reads of it."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=100, max_position_embeddings=4096, hidden_size=64, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, intermediate_size=128).save_pretrained(tmp_path)
    return str(tmp_path)


def test_max_model_len_of_a_user_model_comes_from_its_config(model_dir):
    cfg = load_config(None, {"model.path": model_dir, "actors.max_tokens": 1024})
    assert cfg.model.max_model_len == 4096  # max_position_embeddings, not the tiny model's 64
    assert load_config(None, {"model.path": model_dir, "model.max_model_len": 2048}).model.max_model_len == 2048
    assert load_config(None, {}).model.max_model_len == 64  # the tiny default model
    with pytest.raises(ConfigError, match=r"'model.max_model_len': 8192 exceeds the 4096 positions"):
        load_config(None, {"model.path": model_dir, "model.max_model_len": 8192})
    with pytest.raises(ConfigError, match=r"'actors.max_tokens': 4096 leaves no room .*max_model_len=4096"):
        load_config(None, {"model.path": model_dir, "actors.max_tokens": 4096})


def test_a_model_config_that_cannot_be_read_names_model_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(ConfigError, match=r"'model.path': cannot read the model config .* set model.max_model_len"):
        load_config(None, {"model.path": str(tmp_path)})


def test_stop_token_ids_outside_the_vocabulary_are_refused(model_dir):
    assert load_config(None, {"model.path": model_dir, "actors.stop_token_ids": [0, 99]}).actors.stop_token_ids == [0, 99]
    with pytest.raises(ConfigError, match=r"'actors.stop_token_ids': \[100\] outside the vocabulary .*vocab_size 100\)"):
        load_config(None, {"model.path": model_dir, "actors.stop_token_ids": [0, 100]})
    with pytest.raises(ConfigError, match=r"'actors.stop_token_ids': \[-1\]"):
        load_config(None, {"model.path": model_dir, "model.max_model_len": 128, "actors.stop_token_ids": [-1]})


def test_tensor_parallel_size_is_checked_against_the_nodes():
    from launch.cluster import ClusterError, check_fits
    from launch.train import resource_requests

    cfg = load_config(None, {"actors.num_gpus": 1, "actors.tensor_parallel_size": 4})
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 32, "GPU": 2.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 32, "GPU": 3.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 32, "GPU": 8.0}}]
    with pytest.raises(ClusterError, match=r"'actors.num_cpus/tensor_parallel_size/resources'.*'GPU': 4.*'GPU': 3.0"):
        check_fits(resource_requests(cfg), nodes)
    nodes[2]["Alive"] = True
    check_fits(resource_requests(cfg), nodes)  # the 8-GPU node fits one
