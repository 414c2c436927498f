"""The same entry point under `ray job submit` against a real local Ray cluster (`ray start --head`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_training_entry_point(tmp_path, tiny_model_dir):
    # the job's `python` must be this environment's, as it is for a user who activated it
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           # a ~/.ray/auth_token left by another tool would switch the cluster to token auth; the client side
           # does not follow, so pin the mode for both (the cluster only listens on 127.0.0.1 here)
           "RAY_AUTH_MODE": "disabled"}
    port = 6390
    start = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                 "--dashboard-port=8275", "--disable-usage-stats", env=env)
    assert start.returncode == 0, start.stderr
    try:
        env["RAY_ADDRESS"] = "http://127.0.0.1:8275"
        runtime_env = json.dumps({"excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"]})
        out_dir = tmp_path / "out"
        for _ in range(30):  # the head's dashboard agent registers a few seconds after `ray start` returns
            submit = _ray("job", "submit", "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
                          "python", "-m", "launch.train", "--config", "configs/smoke.yaml", "--model.path",
                          tiny_model_dir, "--output_dir", str(out_dir), "--run-dir", str(out_dir / "job-run"),
                          env=env, timeout=600)
            if "No available agent to submit job" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "relay: done" in submit.stdout, submit.stdout[-3000:]
        assert "succeeded" in submit.stdout.lower()
        rows = [json.loads(l) for l in (out_dir / "job-run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert (out_dir / "job-run" / "final" / "model.safetensors").exists()
    finally:
        _ray("stop", "--force", env=env, timeout=120)
