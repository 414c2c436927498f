"""`<run dir>/control.json`: how an operator steers a running job (written by `python -m launch.scale`).

`{"rollout_actors": N}` resizes the rollout fleet, `{"reward_actors": {"rm": N}}` a judge pool, `{"stop": true}` asks for a checkpoint and a clean stop.
The launcher polls the file's mtime once per loop turn; a stale file from an earlier process is removed at
start, so it cannot resize a fresh run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CONTROL = "control.json"


@dataclass
class Control:
    rollout_actors: int | None  # None: not asked to change
    stop: bool
    reward_actors: dict[str, int] = field(default_factory=dict)  # judge model -> pool size asked for


class ControlFile:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / CONTROL
        self.path.unlink(missing_ok=True)
        self._mtime = 0.0

    def poll(self) -> Control | None:
        """The file's request if it changed since the last poll, else None."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            control = json.loads(self.path.read_text())
            n = control.get("rollout_actors")
            judges = {str(k): int(v) for k, v in (control.get("reward_actors") or {}).items() if int(v) >= 1}
            return Control(int(n) if n is not None and int(n) >= 1 else None, bool(control.get("stop")), judges)
        except (ValueError, TypeError, AttributeError):
            return None  # a malformed file: launch.scale writes atomically, so this is someone else's
