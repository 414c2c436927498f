"""The README's cluster commands, run as written, against a real local Ray cluster with token authentication on.

The commands are read from the README's "On a Ray cluster" block, so the test fails when the README's commands
stop working. Only what must differ on a shared test machine is changed: the ports (another Ray may be running),
the CPUs, the venv's location, and the job (the smoke config on the tiny model instead of the default job).
HOME is a fresh directory: no ~/.ray/auth_token exists, as on a new machine.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT, DASHBOARD = 6390, 8275


def readme_cluster_commands() -> list[str]:
    """The README's cluster block as one command per entry (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## On a Ray cluster\s+```bash\n(.*?)```", text, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def for_this_machine(cmd: str, job_args: str) -> str:
    cmd = cmd.replace(".venv/bin/", f"{BIN}/").replace("127.0.0.1:8265", f"127.0.0.1:{DASHBOARD}")
    if " start --head" in cmd:
        cmd += f" --port={PORT} --dashboard-port={DASHBOARD} --num-cpus=2 --disable-usage-stats"
    return re.sub(r"--config configs/default\.yaml --output_dir \S+", job_args, cmd)


def _run(cmd: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_cluster_commands_run_with_token_auth(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # the job's `python` must be this environment's, as it is for a user who activated it
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '')}")
    out_dir = tmp_path / "out"
    job_args = (f"--config configs/smoke.yaml --model.path {tiny_model_dir} --output_dir {out_dir} "
                f"--run-dir {out_dir / 'job-run'}")
    commands = [for_this_machine(c, job_args) for c in readme_cluster_commands() if "<job id>" not in c]
    assert any(" job submit " in c for c in commands) and any(c.startswith("export RAY_AUTH_MODE=token") for c in commands)
    try:
        for cmd in commands:
            if cmd.startswith("export "):
                key, _, value = cmd.removeprefix("export ").partition("=")
                env[key] = shlex.split(value)[0]
                continue
            for _ in range(30):  # the head's dashboard agent registers a few seconds after `ray start` returns
                done = _run(cmd, env, timeout=600)
                if "No available agent to submit job" not in done.stdout + done.stderr:
                    break
                time.sleep(2)
            assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert (home / ".ray" / "auth_token").is_file()  # the cluster ran with a token, made by the README's line
        assert "relay: done" in done.stdout and "succeeded" in done.stdout.lower(), done.stdout[-3000:]
        rows = [json.loads(l) for l in (out_dir / "job-run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert (out_dir / "job-run" / "final" / "model.safetensors").exists()

        # The same cluster from a machine without its token: Relay stops before starting anything, saying why.
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        denied = _run(f"{BIN}/python -m launch.train --config configs/smoke.yaml --model.path {tiny_model_dir} "
                      f"--output_dir {tmp_path / 'denied'} --ray.address 127.0.0.1:{PORT}",
                      {**env, "HOME": str(stranger)}, timeout=300)
        assert denied.returncode == 2, denied.stdout[-2000:] + denied.stderr[-2000:]
        assert "refused this process" in denied.stderr and "no token is available here" in denied.stderr, denied.stderr[-2000:]
        assert "RAY_AUTH_TOKEN" in denied.stderr
    finally:
        _run(f"{BIN}/ray stop --force", env, timeout=120)
