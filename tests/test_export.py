"""launch.export without a run: a buffer with a run dir logs what it stores; the export loads back bit-exact."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from buffer import BufferConfig, ReplayBuffer, rollouts_to_arrow
from buffer.offline import read_offline
from buffer.schema import SCHEMA_VERSION
from buffer.testing import fake_group
from launch.export import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from launch.data import arithmetic_corpus
    from launch.model import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(arithmetic_corpus(4), vocab_size=64).save_pretrained(out)
    return str(out)


def _groups(rng: np.random.Generator, tok, n: int) -> list:
    rows = []
    for g in range(n):
        prompt = tok(f"{g % 5}+{g % 3}=")["input_ids"]
        for r in fake_group(f"g{g}", group_size=4, policy_version=g, response_len=3):
            response = rng.integers(0, len(tok), 3).tolist()
            rows.append(dataclasses.replace(
                r, token_ids=prompt + response, prompt_len=len(prompt), reward=float(rng.random()),
                behaviour_logprobs=(-rng.random(3) * 5).astype(np.float32).tolist(),  # full float32 mantissas
                token_versions=[g, g, g + 1], data_source=f"src{g % 2}"))
    return rows


def test_export_holds_every_stored_group_and_loads_back_bit_exact(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: null}\n")
    rows = _groups(np.random.default_rng(0), tok, 6)
    buf = ReplayBuffer(BufferConfig(max_staleness=100, capacity_groups=2), groups_per_step=1, run_dir=str(run))
    buf.put(rollouts_to_arrow(rows[:12]))
    buf.sample(1, 0, timeout=1)  # served and gone
    buf.put(rollouts_to_arrow(rows[12:]))  # capacity 2: older groups are evicted
    assert buf.stats()["size_groups"] == 2

    out = tmp_path / "out" / "rollouts.parquet"
    assert main([str(run), str(out), "--tokenizer", tokenizer_dir]) == 0
    table = pq.read_table(out)
    assert table.schema.metadata[b"relay.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.column("group_id").to_pylist() == [r.group_id for r in rows]  # all 6 groups, in stored order
    assert table.column("prompt_text").to_pylist() == [tok.decode(r.token_ids[:r.prompt_len]) for r in rows]
    assert table.column("response_ids").to_pylist() == [r.token_ids[r.prompt_len:] for r in rows]

    back = read_offline(str(out))
    want = rollouts_to_arrow(rows)
    for name in ("token_ids", "behaviour_logprobs", "token_versions"):
        a, b = (pc.list_flatten(t.column(name)).to_numpy() for t in (want, back))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("reward", "prompt_len", "policy_version", "data_source", "group_id", "rollout_id", "generator_id"):
        assert back.column(name).to_pylist() == want.column(name).to_pylist(), name


def test_export_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "o.parquet")]) == 2
    assert "run directory" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert main([str(run), str(tmp_path / "o.parquet")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run / "config.yaml").write_text("buffer: {rollout_log: false}\n")
    assert main([str(run), str(tmp_path / "o.parquet")]) == 2
    assert "buffer.rollout_log is false" in capsys.readouterr().err
    (run / "rollouts").mkdir()
    assert main([str(run), str(tmp_path / "o.parquet")]) == 2
    assert "stored no rollouts" in capsys.readouterr().err
    (run / "config.yaml").write_text("model: {path: /no/model}\n")
    ReplayBuffer(BufferConfig(), 1, run_dir=str(run)).put(rollouts_to_arrow(fake_group("g")))
    assert main([str(run), str(tmp_path / "o.parquet")]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
