"""`python -m benchmarks.gpu_check --tiny`: every row of the GPU check runs on CPU, and nothing of it needs Ray,
vLLM or pyarrow (the lent GPU machines have neither Ray nor vLLM; see the README's benchmarks section)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ("fused_adam", "learner_zero0", "learner_zero2", "objectives", "logprobs_fp32", "logprobs_bf16",
        "process_group", "save_pretrained", "throughput", "import_graph")
HEAVY = ("ray", "vllm", "pyarrow")
# Importing a module whose sys.modules entry is None raises ImportError: the run sees a machine without them.
BLOCKED_RUN = ("import sys; sys.modules.update(dict.fromkeys({heavy!r})); from benchmarks.gpu_check import main; "
               "sys.exit(main(['--tiny', '--json', {out!r}]))")


def test_tiny_run_every_row_ok_or_skipped_without_ray_vllm_or_pyarrow(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = BLOCKED_RUN.format(heavy=HEAVY, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == list(ROWS)
    for r in rows:
        assert r["result"] == "ok" or r["result"].startswith("skipped:"), r
    table = proc.stdout.splitlines()
    for name in ROWS:  # the printed summary has a line per row
        assert any(line.startswith(name + " ") for line in table), (name, proc.stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["import_graph"]["value"] == 0
    assert by_name["logprobs_fp32"]["value"] < 1e-3 and by_name["save_pretrained"]["value"] == 0.0
    assert by_name["throughput"]["value"] > 0 and "MFU n/a" in by_name["throughput"]["note"]


def test_import_graph_has_no_ray_vllm_or_pyarrow():
    """Every module the check imports, at import time (`-X importtime` lists each one imported)."""
    code = ("import benchmarks.gpu_check, benchmarks.learner_memory, learner.learner, learner.config, "
            "learner.batch, learner.objectives, learner.safe_state")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "deepspeed" in imported and "transformers" not in HEAVY  # the listing is real
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
