"""Resumable run checkpoints: learner state, weights, buffer and the launcher's own position, written atomically.

Layout under `<run dir>/checkpoints/`:
    step-00000200/learner/    DeepSpeed state of every rank (optimizer, scheduler, step, RNG)
    step-00000200/model/      the weights as Hugging Face safetensors (what resumed generators load)
    step-00000200/buffer/     the replay buffer (Arrow IPC + manifest with checksums, incl. request ledger)
    step-00000200/launcher.json  step, data position, requests in flight, counters
    latest                    the name of the newest complete checkpoint
A checkpoint is assembled in a hidden temporary directory and renamed into place,
and `latest` is replaced after that, so an interrupted save leaves the previous
checkpoint (and the pointer to it) untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray

LATEST = "latest"


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, ranks: list, buffer, state: dict, keep: int, timeout_s: float) -> Path:
    """Write checkpoint `step`; every learner rank takes part (DeepSpeed and ZeRO-3 gathers are collective)."""
    base = root(run_dir)
    final, tmp = base / f"step-{step:08d}", base / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get([r.save_checkpoint.remote(str(tmp / "learner")) for r in ranks], timeout=timeout_s)
    ray.get([r.save_pretrained.remote(str(tmp / "model")) for r in ranks], timeout=timeout_s)
    ray.get(buffer.save.remote(str(tmp / "buffer")), timeout=timeout_s)
    _write_json(tmp / "launcher.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text(base / LATEST, final.name)
    for old in sorted(base.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; a clear error when there is none."""
    pointer = root(run_dir) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"run {run_dir} has no checkpoint ({pointer} missing): "
                                "set learner.checkpoint_every > 0 to make runs resumable")
    path = root(run_dir) / pointer.read_text().strip()
    for part in ("learner", "model", "buffer", "launcher.json"):
        if not (path / part).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {part} is missing")
    return path


def load_state(path: Path) -> dict:
    return json.loads((path / "launcher.json").read_text())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj))
