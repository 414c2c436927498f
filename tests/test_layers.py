"""The import-layer contract in pyproject.toml ([tool.importlinter]) holds: launch above actors | learner above
buffer | transport above common, and no package's modules import each other in a circle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail("lint-imports not installed: it comes with the dev extra (import-linter); run `make setup`")
    # --no-cache: no .import_linter_cache left in the working tree, and never a stale graph
    proc = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout, proc.stdout
