"""Smoke test of the benchmark runner: `--quick` runs every benchmark and writes well-formed results.

Benchmarks are never part of the timed suite; this only checks that the runner
works end to end (real Ray, vLLM, DeepSpeed and, when installed, TRL) and that
its JSON has every required name and field, with a number wherever the
benchmark could run here.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import REQUIRED_FIELDS, REQUIRED_NAMES, markdown, result, skipped, spread


def test_result_row_ratio_and_target():
    row = result("x", 3.0, 2.0, "tokens/s", 1.3, [1, 2])
    assert row["ratio"] == 1.5 and row["met"] is True
    assert result("y", 1.0, 4.0, "s", 0.1, [], lower_is_better=True)["met"] is False  # 0.25 > 0.1
    empty = skipped("z", "s", 0.1, "not here")
    assert empty["value"] is None and empty["ratio"] is None and empty["met"] is None and empty["note"] == "not here"
    assert spread([1.0, 2.0, 3.0]) == 1.0


def test_scaling_note_names_the_saturation_point():
    from benchmarks.scaling import saturation_note

    note = saturation_note({1: 2500.0, 2: 5100.0, 4: 5140.0}, cores=2)
    assert "saturates at 2 actor(s)" in note and "2: 2.04x" in note
    assert "saturates at 4 actor(s)" in saturation_note({1: 1.0, 2: 2.0, 4: 3.9}, cores=4)


@pytest.mark.slow
def test_rollout_parts_times_every_layer_on_the_same_requests():
    """The diagnostic behind rollout_vs_bare_vllm's gap: every layer timed, the shares of the excess add up."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rollout_parts", "--quick"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from benchmarks.rollout_parts import LAYERS

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = out["ms_per_request"]
    assert list(ms) == list(LAYERS) and all(v > 0 for v in ms.values()), ms
    assert len(out["samples_s"]["relay_path"]) == out["config"]["repeats"]
    assert ms["engine_in_relay_request"] < ms["relay_generate"] < ms["relay_path"], ms  # each wraps the one before
    if ms["relay_path"] > ms["bare_packed"]:
        assert math.isclose(sum(out["share_of_excess"].values()), 1.0, rel_tol=1e-2), out


@pytest.mark.slow
def test_quick_run_writes_well_formed_json(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    stamped = [p for p in tmp_path.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == doc
    machine = doc["machine"]
    for key in ("cores", "memory_gib", "cpu_model", "versions", "loadavg_start", "loadavg_end"):
        assert machine[key], key
    assert machine["versions"]["torch"] and machine["versions"]["ray"]
    assert [r["name"] for r in doc["results"]] == list(REQUIRED_NAMES)
    trl_here = importlib.util.find_spec("trl") is not None
    for r in doc["results"]:
        assert set(REQUIRED_FIELDS) <= set(r), r["name"]
        if r["name"].startswith("e2e_vs_trl_grpo") and not trl_here:
            assert r["value"] is None and "trl" in r["note"]
            continue
        for key in ("value", "baseline", "ratio"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key, r)
        assert math.isclose(r["ratio"], r["value"] / r["baseline"], rel_tol=1e-2), r["name"]
        assert r["samples"], r["name"]
    assert (tmp_path / "latest.md").read_text() == markdown(doc)


@pytest.mark.slow
def test_learner_memory_quick_rows_and_no_ray_vllm_or_pyarrow():
    """Both paths of the learner benchmark run in their own processes on torch, transformers and DeepSpeed alone
    (what a GPU machine without vLLM or Ray has) and report their peaks and speeds as ratios."""
    from benchmarks.learner_memory import measure, rows_from

    samples = measure("quick", (64,), rows=2)
    assert samples[0]["heavy_imports"] == []
    memory, speed = rows_from(samples, {})
    assert memory["name"] == "learner_memory_vs_full_logits" and memory["target_is"] == "max"
    for row in (memory, speed):
        assert row["value"] > 0 and row["baseline"] > 0 and row["ratio"] == pytest.approx(row["value"] / row["baseline"], rel=1e-2)
    assert samples[0]["relay_mfu"] > 0 and samples[0]["params"] > 151_936 * 64


def test_a_subprocess_peak_is_its_own_not_its_parents():
    """learner_memory's children report VmHWM: a child started by a process holding 0.75 GiB peaks far below it
    (ru_maxrss, which Linux keeps across execve, read the parent's mark: both paths then showed one floor)."""
    from benchmarks.common import rss_gib

    if rss_gib("VmHWM") is None:
        pytest.skip("no /proc/self/status here")
    held = bytearray(3 * 2**28)  # 0.75 GiB, every page touched
    held[::4096] = b"x" * len(held[::4096])
    code = "from benchmarks.common import rss_gib; print(rss_gib('VmHWM'))"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert rss_gib("VmHWM") > 0.75 and child < 0.25, (rss_gib("VmHWM"), child)
    del held


def test_plain_linear_quick_rows_agree_with_f_linear():
    """The plain layout's matmul diagnostic: every tiny-model shape timed three ways plus the pack, and the plain
    matmul (oneDNN on the live weight where torch has it) gives F.linear's numbers."""
    import torch

    from benchmarks.plain_linear import SHAPES, run

    threads = torch.get_num_threads()
    out = run(quick=True)
    assert torch.get_num_threads() == threads  # the suite's later in-process learners keep theirs
    assert set(out["shapes"]) == {k for k in SHAPES if k.startswith("tiny")}
    for row in out["shapes"].values():
        assert set(row["us"]) == {"pack", "packed", "plain", "f_linear"} and all(v > 0 for v in row["us"].values()), row
        assert row["pack_calls"] > 0, row
        assert row["max_abs_diff_vs_f_linear"] < 1e-4, row
    assert out["plain_matmul"] == ("_onednn_linear" if torch.backends.mkldnn.is_available() else "linear")
