"""The typed config: defaults, shipped YAML files, dotted overrides, and bad input failing early with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, RunConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_consistent():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.buffer.max_staleness >= cfg.learner.publish_every - 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path, monkeypatch):
    """Every rule but a dataset's presence: the prompt files a GPU config names (data/gsm8k_train.jsonl) are the
    user's to fetch, so empty stand-ins take their place here. GPU configs load without Ray or GPUs."""
    import yaml

    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    monkeypatch.chdir(tmp_path)
    sources = [(s.get("train"), s.get("eval")) for s in data.get("sources") or []]  # data.sources: a mixture
    for source in (data.get("train"), data.get("eval"), *(path for pair in sources for path in pair)):
        if source and not source.startswith("synthetic:") and not Path(source).is_absolute():
            (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / source).touch()
    cfg = load_config(str(path))
    assert cfg.actors.max_tokens < cfg.model.max_model_len


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(None, parse_overrides(["--learner.lr", "1e-5", "--actors.n=4", "--buffer.max_staleness", "0"]))
    assert cfg.learner.lr == 1e-5 and cfg.actors.n == 4 and cfg.buffer.max_staleness == 0
    cfg = load_config(None, parse_overrides(["--learner.objective.name", "agro", "--learner.objective.beta", "0.05"]))
    assert cfg.learner.objective.name == "agro" and cfg.learner.objective.beta == 0.05


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--learner.lrr", "1"], "unknown config key 'learner.lrr'"),
        (["--nonsense", "1"], "unknown config key 'nonsense'"),
        (["--learner.groups_per_step", "-4"], "'learner.groups_per_step'"),
        (["--actors.temperature", "hot"], "'actors.temperature'"),
        (["--model.path", "/does/not/exist"], "'model.path': /does/not/exist does not exist"),
        (["--data.train", "/no/such/prompts.jsonl"], "dataset file /no/such/prompts.jsonl does not exist"),
        (["--learner.num_ranks", "3"], "not divisible by learner.num_ranks=3"),
        (["--learner.publish_every", "4", "--buffer.max_staleness", "1"], "'buffer.max_staleness'"),
        (["--actors.prompts_per_request", "64", "--buffer.max_staleness", "0"], "'actors.prompts_per_request'"),
        (["--learner.objective.name", "no_such_loss"], "'learner.objective.name'"),
        (["--buffer.filter", "zero_variance", "--actors.n", "1"], "'buffer.filter': zero_variance"),
        (["--buffer.filter", "dynamic"], "'buffer.filter'"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, parse_overrides(overrides))
    assert message in str(err.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("learner:\n  batch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'learner.batch'"):
        load_config(str(nested))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_bad_input_fails_with_one_line_before_any_actor():
    for args, needle in ((["--learner.groups_per_step", "-1"], "learner.groups_per_step"),
                         (["--model.path", "/missing/model"], "/missing/model"),
                         (["--data.train", "/missing.jsonl"], "/missing.jsonl"),
                         (["--learner.batch", "3"], "unknown config key 'learner.batch'")):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        assert "ray" not in proc.stdout.lower()


def test_cli_dry_run_prints_config_and_placement():
    import yaml

    proc = _cli("--dry-run", "--actors.num_actors", "3", "--learner.num_ranks", "2")
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    rows = {r["actor"]: r for r in out["placement"]}
    assert rows["rollout"]["count"] == 3 and rows["learner_rank"]["count"] == 2
    assert out["config"]["actors"]["num_actors"] == 3
    json.dumps(out)  # plain data only


def test_in_flight_updates_refuse_push_transports():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="actors.weight_update_mode"):
        load_config(None, {"actors.weight_update_mode": "in_flight", "weights.transport": "nccl"})
    assert load_config(None, {"actors.weight_update_mode": "in_flight"}).actors.weight_update_mode == "in_flight"


def test_shared_memory_transport_refuses_what_it_cannot_serve():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="shared_memory serves vLLM's plain CPU weight layout; actors.cpu_weight_layout is 'packed'"):
        load_config(None, {"weights.transport": "shared_memory", "actors.cpu_weight_layout": "packed"})
    with pytest.raises(ConfigError, match="shared_memory serves generators on CPU"):
        load_config(None, {"weights.transport": "shared_memory", "actors.num_gpus": 1})
    assert load_config(None, {"weights.transport": "shared_memory"}).weights.transport == "shared_memory"


def test_token_sum_constant_defaults_to_actors_max_tokens():
    """Dr.GRPO's B * max_len takes max_len from the generators' longest possible answer unless set explicitly;
    a resumed run's config.yaml (every field spelt out) loads back to the same config."""
    cfg = load_config(None, parse_overrides(["--actors.max_tokens", "24", "--learner.objective.name", "dr_grpo"]))
    assert cfg.learner.objective.max_len == 24
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    explicit = load_config(None, parse_overrides(["--actors.max_tokens", "24", "--learner.objective.max_len", "32"]))
    assert explicit.learner.objective.max_len == 32
    assert RunConfig().learner.objective.max_len == RunConfig().actors.max_tokens
    dpo = load_config(None, parse_overrides(["--learner.objective.name", "dpo", "--learner.objective.beta", "0.1"]))
    assert dpo.learner.objective.max_len is None  # DPO aggregates nothing: no constant to set
    with pytest.raises(ConfigError, match="'learner.objective.max_len': 8 is shorter than actors.max_tokens=24"):
        load_config(None, parse_overrides(["--actors.max_tokens", "24", "--learner.objective.max_len", "8"]))


def test_a_knob_the_objective_ignores_fails_naming_key_and_objective():
    with pytest.raises(ConfigError, match="'learner.objective'.*beta=0.1 is not read by objective 'gspo'"):
        load_config(None, parse_overrides(["--learner.objective.name", "gspo", "--learner.objective.beta", "0.1"]))


def test_sampling_the_learner_cannot_reproduce_is_refused():
    """vLLM records log-probs under the top-p/top-k truncated distribution, the learner computes the full softmax:
    every ratio would be off, so the config refuses it before any actor starts."""
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'actors.top_p'.*importance ratio would be biased"):
        load_config(None, {"actors.top_p": 0.9})
    with pytest.raises(ConfigError, match=r"'actors.top_k'"):
        load_config(None, {"actors.top_k": 20})
    assert load_config(None, {"actors.top_p": 1.0, "actors.top_k": 0}).actors.top_p == 1.0


def test_reward_spec_is_resolved_at_config_time(tmp_path):
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'actors.reward'.*missing.py does not exist"):
        load_config(None, {"actors.reward": str(tmp_path / "missing.py") + ":score"})
    user = tmp_path / "my_reward.py"
    user.write_text("def score(response, answer):\n    return float(response.strip() == answer)\n")
    with pytest.raises(ConfigError, match=r"'actors.reward'.*has no function nope"):
        load_config(None, {"actors.reward": f"{user}:nope"})
    with pytest.raises(ConfigError, match=r"'actors.reward'.*not one of"):
        load_config(None, {"actors.reward": "no_such_builtin"})
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import no_such_module_anywhere\n")
    with pytest.raises(ConfigError, match=r"'actors.reward': ModuleNotFoundError"):
        load_config(None, {"actors.reward": f"{broken}:score"})
    assert load_config(None, {"actors.reward": f"{user}:score"}).actors.reward == f"{user}:score"


def test_nccl_needs_gpus_on_both_sides():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'weights.transport': nccl .* actors.num_gpus=0.0 and learner.num_gpus=0.0"):
        load_config(None, {"weights.transport": "nccl"})
    with pytest.raises(ConfigError, match=r"learner.num_gpus=0.0"):
        load_config(None, {"weights.transport": "nccl", "actors.num_gpus": 1})
    cfg = load_config(None, {"weights.transport": "nccl", "actors.num_gpus": 1, "learner.num_gpus": 1})
    assert cfg.weights.transport == "nccl"
