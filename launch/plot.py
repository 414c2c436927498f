"""`python -m launch.plot <run dir> [--out DIR]`: training curves from a run's metrics.jsonl.

Writes one PNG per panel (reward and held-out eval reward, response length,
entropy, KL to reference, staleness, throughput, time per step, rollout fleet)
plus `overview.png` with all of them, into
`<run dir>/plots/` unless `--out` names another folder. Null values are skipped;
noisy lines get a light rolling mean drawn over the raw values.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

class Series(NamedTuple):
    key: str
    label: str
    smooth: bool = True  # rolling mean over noisy per-step values; off for integer counts and sparse eval points
    right: bool = False  # on a second y axis (another unit or scale)
    style: str = "-"


class Panel(NamedTuple):
    stem: str
    title: str
    ylabel: str
    series: list[Series]
    right_label: str = ""
    integer: bool = False  # counts: whole-number ticks, zero in view


PANELS = [
    Panel("reward", "Reward", "reward", [Series("reward_mean", "sampled (train)"),
                                         Series("eval/reward_mean", "held-out, greedy (eval)", smooth=False)]),
    Panel("response_length", "Response length", "tokens",
          [Series("response_length_mean", "sampled (train)"),
           Series("eval/response_length_mean", "held-out, greedy (eval)", smooth=False)]),
    Panel("entropy", "Entropy", "nats / token", [Series("entropy_mean", "mean entropy")]),
    Panel("kl_to_ref", "KL to reference", "KL", [Series("kl_to_ref", "KL(pi || ref)")]),
    # The max is dashed over the mean: in a run at its bound the two coincide and a solid max would hide the mean.
    Panel("staleness", "Staleness", "policy versions", [Series("staleness_mean", "mean", smooth=False),
                                                        Series("staleness_max", "max", smooth=False, style="--")]),
    Panel("throughput", "Throughput", "samples / s", [Series("samples_per_s", "samples/s"),
                                                      Series("tokens_per_s", "tokens/s", right=True)], "tokens / s"),
    Panel("step_time", "Time per step", "seconds", [Series("learner_step_s", "learner step"),
                                                    Series("weight_sync_s", "weight publish"),
                                                    Series("weight_load_s", "weight load (generator)")]),
    Panel("fleet", "Rollout fleet", "count", [Series("rollout_actors", "rollout actors", smooth=False),
                                              Series("actor_restarts", "actor restarts (total)", smooth=False, style="--")],
          integer=True),
]
KEYS = {s.key for panel in PANELS for s in panel.series}


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


def _draw(ax, rows: list[dict], panel: Panel) -> bool:
    drawn, right = False, None
    for i, series in enumerate(panel.series):
        xs, ys = _series(rows, series.key)
        if not xs:
            continue
        if series.right and right is None:
            right = ax.twinx()
            right.set_ylabel(panel.right_label)
        target, color = (right if series.right else ax), f"C{i}"
        window = max(1, len(ys) // 20) if series.smooth else 1
        if window > 1:
            target.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, linestyle=series.style)
            target.plot(xs, _rolling(ys, window), color=color, linewidth=1.6, linestyle=series.style,
                        label=f"{series.label} (rolling {window})")
        else:
            sparse = len(xs) < 30 or series.key.startswith("eval/")
            target.plot(xs, ys, color=color, linewidth=1.4, linestyle=series.style, marker="o" if sparse else None,
                        markersize=4, label=series.label)
        drawn = True
    ax.set_title(panel.title)
    ax.set_xlabel("learner step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.integer and drawn:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.5, max(ax.get_ylim()[1], 1) + 0.5)
    if drawn:  # one legend for both axes
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            h2, l2 = right.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Plot `<run_dir>/metrics.jsonl` into `out_dir` (default `<run_dir>/plots`); returns the PNGs written.
    A panel none of whose metrics the run logged gets no PNG of its own (the overview shows it as "no data")."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    rows = load_rows(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if _draw(ax, rows, panel):
            fig.tight_layout()
            fig.savefig(out / f"{panel.stem}.png")
            written.append(out / f"{panel.stem}.png")
        plt.close(fig)
    cols = (len(PANELS) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), dpi=100)
    for ax, panel in zip(axes.flat, PANELS):
        _draw(ax, rows, panel)
    steps = sum(1 for r in rows if _num(r.get("reward_mean")) is not None)  # eval lines share step numbers
    evals = sum(1 for r in rows if _num(r.get("eval/reward_mean")) is not None)
    fig.suptitle(f"{run_dir.resolve().name}: {steps} learner steps" + (f", {evals} evaluations" if evals else ""))
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
