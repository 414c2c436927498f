"""Off-policy data end to end on the tiny default job: semi-online DPO/IPO (learner.publish_every = s), rollout
export that loads back as offline data, and DAPO's dynamic sampling (buffer.filter: zero_variance).

Each run is a whole system (local Ray, a vLLM rollout actor, the buffer, a DeepSpeed learner), kept short: few
steps, small batches. The runs are module fixtures shared by the tests that read them."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from launch.config import load_config, parse_overrides

pytestmark = pytest.mark.slow

GROUPS = 4  # groups per learner step (and per request)


def _run(run_dir, model_dir, *overrides: str):
    from launch.train import run

    cfg = load_config(None, parse_overrides([
        "--model.path", model_dir, "--data.max_operand", "4", "--output_dir", str(run_dir.parent),
        "--progress", "false", "--tensorboard", "false", "--ray.num_cpus", "3", "--actors.num_cpus", "1",
        "--learner.num_cpus", "1", "--learner.groups_per_step", str(GROUPS), "--actors.prompts_per_request",
        str(GROUPS), "--learner.micro_batch_groups", str(GROUPS), "--learner.checkpoint_every", "0", *overrides]))
    summary = run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "reward_mean" in r]


@pytest.fixture(scope="module")
def semi_online(tmp_path_factory, tiny_model_dir):
    """(objective, s) -> run dir: dpo and ipo at s = 1 (on-policy) and s = 4 (weights published every 4 steps)."""
    runs = {}
    for objective in ("dpo", "ipo"):
        for s, steps in ((1, 4), (4, 9)):  # s = 4 over 9 steps: versions 0, 4 and 8 are published
            run_dir = tmp_path_factory.mktemp(f"{objective}-s{s}") / "run"
            beta = ["--learner.objective.beta", "0.1"] if objective == "dpo" else []  # dpo has no default beta
            summary, rows = _run(run_dir, tiny_model_dir, "--learner.objective.name", objective, *beta,
                                 "--learner.publish_every", str(s), "--buffer.max_staleness", str(max(s - 1, 1)),
                                 "--learner.total_steps", str(steps))
            assert len(rows) == steps and summary["ledger"]["groups_lost"] == 0
            runs[objective, s] = run_dir
    return runs


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
@pytest.mark.parametrize("s", [1, 4])
def test_semi_online_generators_serve_only_multiples_of_s(semi_online, objective, s):
    from buffer.rollout_log import read_log

    log = read_log(str(semi_online[objective, s] / "rollouts"))
    versions = set(pc.list_flatten(log.column("token_versions")).to_pylist())
    assert versions and all(v % s == 0 for v in versions), sorted(versions)
    assert set(log.column("policy_version").to_pylist()) <= versions
    # not vacuous: the staleness bound (max_staleness = max(s - 1, 1)) makes the last step train on new weights:
    # s = 4 over 9 steps needs version >= 5 at step 9, and only 8 is a multiple; s = 1 needs version >= 2 at step 4
    assert max(versions) == 8 if s == 4 else max(versions) >= 2, sorted(versions)


def test_export_loads_back_as_offline_data_bit_exact(semi_online, tmp_path):
    from buffer import BufferConfig, ReplayBuffer
    from buffer.offline import read_offline
    from buffer.rollout_log import read_log
    from buffer.schema import SCHEMA_VERSION
    from launch.export import main

    run_dir = semi_online["dpo", 4]
    out = tmp_path / "export" / "rollouts.parquet"
    assert main([str(run_dir), str(out)]) == 0
    logged = read_log(str(run_dir / "rollouts"))
    exported = pq.read_table(out)
    assert exported.schema.metadata[b"relay.schema_version"] == str(SCHEMA_VERSION).encode()
    assert exported.num_rows == logged.num_rows > 0
    # every group the buffer accepted, also those it served and let go
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(set(exported.column("group_id").to_pylist())) == summary["buffer"]["inserts"]
    back = read_offline(str(out))
    for name in ("token_ids", "behaviour_logprobs", "token_versions"):  # bit-exact, not approximately
        a = pc.list_flatten(logged.column(name)).to_numpy()
        b = pc.list_flatten(back.column(name)).to_numpy()
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("prompt_len", "reward", "policy_version", "generator_id", "data_source", "group_id", "rollout_id"):
        assert back.column(name).to_pylist() == logged.column(name).to_pylist(), name
    # prompt/response ids and text are the rows' own tokens, decoded with the run's tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir / "final"))
    row = exported.slice(0, 1).to_pylist()[0]
    assert row["prompt_ids"] + row["response_ids"] == row["token_ids"]
    assert row["prompt_text"] == tok.decode(row["prompt_ids"]) and "=" in row["prompt_text"]
    assert all(math.isfinite(x) for x in row["behaviour_logprobs"])
    buf = ReplayBuffer(BufferConfig(capacity_groups=4096), groups_per_step=1)
    assert buf.load_offline(str(out)) == summary["buffer"]["inserts"]


def test_zero_variance_filter_keeps_batches_full_and_the_ledger_exact(tmp_path, tiny_model_dir):
    steps = 6
    summary, rows = _run(tmp_path / "run", tiny_model_dir, "--buffer.filter", "zero_variance",
                         "--learner.total_steps", str(steps), "--actors.n", "4")
    ledger, buffer = summary["ledger"], summary["buffer"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["rows"] == GROUPS * 4 for r in rows)  # every step trained on a full batch (groups x actors.n)
    assert ledger["groups_lost"] == 0 and ledger["groups_trained_too_often"] == 0
    # the warm-started model answers many prompts right every time: all-right groups are filtered
    assert ledger["groups_filtered"] == buffer["filtered_zero_variance"] > 0
    assert ledger["groups_dispatched"] > steps * GROUPS  # extra prompts replaced the filtered groups
    # no group the learner saw has all rewards equal: read back from the rollout log (what the buffer stored)
    from buffer.rollout_log import read_log

    log = read_log(str(tmp_path / "run" / "rollouts")).to_pandas()
    spread = log.groupby("group_id")["reward"].agg(lambda r: np.ptp(r.to_numpy()))
    assert (spread > 0).all() and len(spread) == buffer["inserts"]
    rates = [(r["filter_rate"], r["filter_rate_recent"]) for r in rows if "filter_rate" in r]
    assert rates and 0 < rates[-1][0] <= 1 and all(0 <= recent <= 1 for _, recent in rates)


def test_everything_filtered_fails_naming_the_filter_within_the_sample_timeout(tmp_path, tiny_model_dir):
    reward = tmp_path / "flat.py"
    reward.write_text("def flat(response, answer):\n    return 1.0\n")  # every group all-equal: all filtered
    with pytest.raises(TimeoutError, match=r"buffer.filter=zero_variance dropped \d+ of the \d+ groups it checked"):
        _run(tmp_path / "run", tiny_model_dir, "--buffer.filter", "zero_variance", "--learner.total_steps", "2",
             "--actors.reward", f"{reward}:flat", "--learner.sample_timeout_s", "60")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "filter_dropped_everything" for e in events)
