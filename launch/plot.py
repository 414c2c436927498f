"""`python -m launch.plot <run dir> [--out DIR]`: training curves from a run's metrics.jsonl.

Writes one PNG per panel (reward, response length, entropy, KL to reference,
staleness, throughput) plus `overview.png` with all of them, into
`<run dir>/plots/` unless `--out` names another folder. Null values are skipped;
noisy lines get a light rolling mean drawn over the raw values.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (file stem, title, y label, [(metric key, legend label), ...])
PANELS = [
    ("reward", "Reward", "reward", [("reward_mean", "mean reward")]),
    ("response_length", "Response length", "tokens", [("response_length_mean", "mean length")]),
    ("entropy", "Entropy", "nats / token", [("entropy_mean", "mean entropy")]),
    ("kl_to_ref", "KL to reference", "KL", [("kl_to_ref", "KL(pi || ref)")]),
    ("staleness", "Staleness", "policy versions", [("staleness_mean", "mean"), ("staleness_max", "max")]),
    ("throughput", "Throughput", "per second", [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")]),
]
KEYS = {key for _, _, _, series in PANELS for key, _ in series}


class PlotError(Exception):
    """Unusable input: the message is one line naming the file."""


def load_rows(path: Path) -> list[dict]:
    """Parse metrics.jsonl, keeping rows with a step and at least one plotted metric."""
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and any(_num(row.get(k)) is not None for k in KEYS):
            rows.append(row)
    if not rows:
        raise PlotError(f"{path}: no usable rows (need 'step' and at least one of {', '.join(sorted(KEYS))})")
    return rows


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        y = _num(row.get(key))
        if y is not None:
            xs.append(float(row["step"]))
            ys.append(y)
    return xs, ys


def _rolling(ys: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _draw(ax, rows: list[dict], title: str, ylabel: str, series: list[tuple[str, str]]) -> bool:
    drawn = False
    for i, (key, label) in enumerate(series):
        xs, ys = _series(rows, key)
        if not xs:
            continue
        color = f"C{i}"
        window = 1 if title == "Staleness" else max(1, len(ys) // 20)  # integer-valued: plot raw
        if window > 1:
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(xs, _rolling(ys, window), color=color, linewidth=1.6, label=f"{label} (rolling {window})")
        else:
            ax.plot(xs, ys, color=color, linewidth=1.4, marker="." if len(xs) < 30 else None, label=label)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Plot `<run_dir>/metrics.jsonl` into `out_dir` (default `<run_dir>/plots`); returns the PNGs written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    rows = load_rows(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, ylabel, series in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if _draw(ax, rows, title, ylabel, series):
            fig.tight_layout()
            fig.savefig(out / f"{stem}.png")
            written.append(out / f"{stem}.png")
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    for ax, (_, title, ylabel, series) in zip(axes.flat, PANELS):
        _draw(ax, rows, title, ylabel, series)
    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} learner steps")
    fig.tight_layout()
    fig.savefig(out / "overview.png")
    plt.close(fig)
    written.append(out / "overview.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", help="output folder (default: <run dir>/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        print(f"relay plot: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
