"""Optional W&B logging: offline runs in the run directory when asked for and installed; a config error when not installed."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config, parse_overrides

BLOCK = 32 * 1024  # W&B's transaction log is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records
HEADER = 7  # ":W&B", magic 0xBEE1, version


def _records(path: Path) -> list[bytes]:
    """Raw protobuf Record payloads of a `.wandb` file (FULL, or FIRST..MIDDLE..LAST fragments joined)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pos, parts = [], HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append(parts)
            parts = b""
    return out


def _read_run(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """(history rows by step, config) of the one offline run under run_dir."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows: dict[int, dict] = {}
    config: dict = {}
    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            rows.setdefault(items["_step"], {}).update(items)
        elif kind in ("run", "config"):
            for item in (rec.run.config if kind == "run" else rec.config).update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, config


def test_metrics_log_writes_an_offline_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    from launch.metrics import MetricsLog

    cfg = load_config(None, parse_overrides(["--wandb", "true", "--name", "wb-test"]))
    log = MetricsLog(tmp_path, 3, tensorboard=False, progress=False, wandb=cfg.model_dump())
    for step in (1, 2, 3):
        log.log({"step": step, "policy_version": step, "reward_mean": 0.25 * step, "kl_to_ref": float("nan")})
        if step == 2:  # as the launcher does: right after the training line of the same step
            log.log_eval(2, {"eval/reward_mean": 0.6, "eval/policy_version": 2})
    log.close()

    rows, config = _read_run(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    assert [rows[s]["train/reward_mean"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert [rows[s]["train/policy_version"] for s in (1, 2, 3)] == [1, 2, 3]
    assert rows[2]["eval/reward_mean"] == 0.6 and "eval/reward_mean" not in rows[3]
    assert "train/kl_to_ref" not in rows[1]  # a NaN (None in metrics.jsonl) is left out, not charted as text
    # the run's resolved config travels with it
    assert config["name"] == "wb-test" and config["learner"]["groups_per_step"] == 16, config


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    # None in sys.modules is how Python marks a package as absent: the same lookup fails as on a machine without it.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="config key 'wandb'.*not installed.*relay-rl\\[wandb\\]"):
        load_config(None, parse_overrides(["--wandb", "true"]))
    assert load_config(None, parse_overrides(["--wandb", "false"])).wandb is False
