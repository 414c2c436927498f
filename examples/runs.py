"""What the evidence examples share: one training run as its own process, and reading its metrics back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

QUIET = ["--progress", "false", "--tensorboard", "false"]


def train(run_dir: Path, args: list[str], extra: list[str]) -> Path:
    """`python -m launch.train` into `run_dir` (its own process, its own Ray); a run already done is kept, so a
    rerun of an example only fills in what is missing. `extra`: the caller's own overrides, applied last."""
    if (run_dir / "summary.json").exists():
        return run_dir
    cmd = [sys.executable, "-m", "launch.train", *QUIET, "--output_dir", str(run_dir.parent / "_out"),
           "--run-dir", str(run_dir), *args, *extra]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise RuntimeError(f"run {run_dir} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    return run_dir


def metric(run_dir: Path, key: str) -> list[float]:
    """`key` of every learner step in the run's metrics.jsonl (steps without it skipped)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r.get(key) is not None]


def last_half(values: list[float]) -> float:
    tail = values[len(values) // 2:]
    return sum(tail) / len(tail)


def smooth(ys: list[float], parts: int = 30) -> list[float]:
    """Rolling mean over ~1/parts of the run (what examples.staleness draws)."""
    k = max(len(ys) // parts, 1)
    return [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
