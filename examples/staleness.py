"""What staleness costs each objective: the default task at sync periods s, reward curves and a table.

s = 0 is on-policy (weights published every step, no rollout older than the learner's version). s > 0 sets
`learner.publish_every = buffer.max_staleness = s`: generators serve a version for s steps and the buffer admits
rollouts up to s versions old, the semi-online regime of the seeds. Each run's score is its mean reward over the
last half of training, shown relative to the same objective at s = 0 and to reinforce at s = 0.

    python -m examples.staleness                       # s in {0, 4, 16}, 600 steps each (~15 runs)
    python -m examples.staleness --s 0 8 --steps 300 --objectives tis agro:0.01
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OBJECTIVES = ["reinforce", "tis", "decoupled_ppo", "agro:0.01", "agro:0.1"]


def run_one(objective: str, s: int, steps: int, out: Path, extra: list[str]) -> Path:
    """One training run as its own process (its own Ray); returns its run directory."""
    name, _, beta = objective.partition(":")
    run_dir = out / f"{objective.replace(':', '-b')}-s{s}"
    if (run_dir / "summary.json").exists():  # already done: a rerun only fills in what is missing
        return run_dir
    args = [sys.executable, "-m", "launch.train", "--progress", "false", "--tensorboard", "false",
            "--learner.total_steps", str(steps), "--learner.checkpoint_every", "0",
            "--learner.objective.name", name, "--output_dir", str(out / "_out"), "--run-dir", str(run_dir)]
    if beta:
        args += ["--learner.objective.beta", beta]
    args += ["--learner.publish_every", str(max(s, 1)), "--buffer.max_staleness", str(s)]
    subprocess.run(args + extra, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def rewards(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["reward_mean"] for r in rows if "reward_mean" in r]


def last_half(values: list[float]) -> float:
    tail = values[len(values) // 2:]
    return sum(tail) / len(tail)


def table(scores: dict[tuple[str, int], float], objectives: list[str], periods: list[int]) -> str:
    base = scores.get(("reinforce", 0))
    lines = ["| objective | s | last-half reward | vs same objective at s=0 | vs reinforce at s=0 |", "|---|---|---|---|---|"]
    for obj in objectives:
        for s in periods:
            if (obj, s) not in scores:
                continue
            v, own = scores[(obj, s)], scores.get((obj, 0))
            rel_own = f"{v / own:.0%}" if own else "-"
            rel_base = f"{v / base:.0%}" if base else "-"
            lines.append(f"| {obj} | {s} | {v:.3f} | {rel_own} | {rel_base} |")
    return "\n".join(lines)


def plot(curves: dict[tuple[str, int], list[float]], objectives: list[str], periods: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(periods), figsize=(5 * len(periods), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], periods):
        for obj in objectives:
            ys = curves.get((obj, s))
            if not ys:
                continue
            k = max(len(ys) // 30, 1)  # rolling mean over ~3% of the run
            smooth = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
            ax.plot(range(1, len(ys) + 1), smooth, label=obj)
        ax.set_title("on-policy (s = 0)" if s == 0 else f"s = {s}")
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward (rolling mean)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.staleness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s", type=int, nargs="+", default=[0, 4, 16], help="sync periods (0 = on-policy)")
    parser.add_argument("--objectives", nargs="+", default=DEFAULT_OBJECTIVES, help="name or name:beta")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=f"runs/staleness-{time.strftime('%Y%m%d-%H%M%S')}")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, scores = {}, {}
    for s in args.s:
        for obj in args.objectives:
            t0 = time.time()
            run_dir = run_one(obj, s, args.steps, out, extra)
            curves[(obj, s)] = rewards(run_dir)
            scores[(obj, s)] = last_half(curves[(obj, s)])
            print(f"{obj:>16} s={s:<3} last-half reward {scores[(obj, s)]:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    text = table(scores, args.objectives, args.s)
    (out / "staleness.md").write_text(text + "\n")
    (out / "scores.json").write_text(json.dumps({f"{o}|{s}": v for (o, s), v in scores.items()}, indent=1))
    plot(curves, args.objectives, args.s, out / "staleness.png")
    print(text)
    print(f"plot: {out / 'staleness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
