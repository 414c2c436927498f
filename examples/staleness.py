"""What staleness costs each objective: the default task at sync periods s, reward curves and a table, over seeds.

s = 0 is on-policy (weights published every step, no rollout older than the learner's version). s > 0 sets
`learner.publish_every = buffer.max_staleness = s`: generators serve a version for s steps and the buffer admits
rollouts up to s versions old, the semi-online regime of the seeds. Each run's score is its mean reward over the
last half of training, shown relative to the same objective at s = 0 and to reinforce at s = 0.

`--seeds k ...` runs every setting once per seed (`--seed k`: the tiny model's initialisation and warm start, the
prompt order, the buffer's sampler, the generators' sampling and the learner). The table gives mean ± std over the
seeds; "kept" is taken per seed against the same seed's s = 0 run (a seed fixes the starting model), then averaged.
At s = 0 a seed reproduces its run exactly; at s > 0 the interleaving of actor and learner is timing-dependent, so
two runs of one seed differ too (the spread over seeds includes that).

    python -m examples.staleness                       # s in {0, 4, 16}, 600 steps each (~15 runs), seed 0
    python -m examples.staleness --s 0 16 --objectives reinforce tis decoupled_ppo --seeds 0 1 2
    python -m examples.staleness --s 0 8 --steps 300 --objectives tis agro:0.01
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from examples.runs import last_half, metric, smooth, train

DEFAULT_OBJECTIVES = ["reinforce", "tis", "decoupled_ppo", "agro:0.01", "agro:0.1"]

Key = tuple[str, int]  # (objective, s)


def run_dir_for(out: Path, objective: str, s: int, seed: int) -> Path:
    """Seed 0 keeps the name runs had before seeds existed, so an earlier output directory is filled in, not redone."""
    name = f"{objective.replace(':', '-b')}-s{s}"
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def run_one(objective: str, s: int, seed: int, steps: int, out: Path, extra: list[str]) -> Path:
    """One training run as its own process (its own Ray); returns its run directory."""
    name, _, beta = objective.partition(":")
    args = ["--seed", str(seed), "--learner.total_steps", str(steps), "--learner.checkpoint_every", "0",
            "--learner.objective.name", name, "--learner.publish_every", str(max(s, 1)),
            "--buffer.max_staleness", str(s)]
    if beta:
        args += ["--learner.objective.beta", beta]
    return train(run_dir_for(out, objective, s, seed), args, extra)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def kept(scores: dict[Key, dict[int, float]], key: Key, base: Key) -> list[float]:
    """Per seed, the run's score over the same seed's score at `base`; seeds missing from either are left out."""
    runs, ref = scores.get(key, {}), scores.get(base, {})
    return [runs[k] / ref[k] for k in runs if ref.get(k)]


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd = mean_std(values)
    return f"{m:.0%}" if len(values) == 1 else f"{m:.0%} ± {sd:.0%}"


def table(scores: dict[Key, dict[int, float]], objectives: list[str], periods: list[int]) -> str:
    lines = ["| objective | s | seeds | last-half reward | vs same objective at s=0 | vs reinforce at s=0 |",
             "|---|---|---|---|---|---|"]
    for obj in objectives:
        for s in periods:
            if not scores.get((obj, s)):
                continue
            per_seed = scores[(obj, s)]
            m, sd = mean_std(list(per_seed.values()))
            reward = f"{m:.3f}" if len(per_seed) == 1 else f"{m:.3f} ± {sd:.3f}"
            lines.append(f"| {obj} | {s} | {len(per_seed)} | {reward} | {_pct(kept(scores, (obj, s), (obj, 0)))} "
                         f"| {_pct(kept(scores, (obj, s), ('reinforce', 0)))} |")
    return "\n".join(lines)


def band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, min and max of the seeds' smoothed curves (cut to the shortest)."""
    smoothed = [smooth(c) for c in curves]
    n = min(map(len, smoothed))
    cols = [[c[i] for c in smoothed] for i in range(n)]
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot(curves: dict[Key, list[list[float]]], objectives: list[str], periods: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(periods), figsize=(5 * len(periods), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], periods):
        for obj in objectives:
            runs = curves.get((obj, s))
            if not runs:
                continue
            mean, low, high = band(runs)
            steps = range(1, len(mean) + 1)
            (line,) = ax.plot(steps, mean, label=obj if len(runs) == 1 else f"{obj} ({len(runs)} seeds)")
            if len(runs) > 1:  # the band is the seeds' range, so one bad seed shows
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title("on-policy (s = 0)" if s == 0 else f"s = {s}")
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward (rolling mean)")
    axes[0][-1].legend(fontsize=8, title="mean; band: min-max over seeds" if any(len(r) > 1 for r in curves.values())
                       else None, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.staleness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s", type=int, nargs="+", default=[0, 4, 16], help="sync periods (0 = on-policy)")
    parser.add_argument("--objectives", nargs="+", default=DEFAULT_OBJECTIVES, help="name or name:beta")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds; each setting runs once per seed")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=f"runs/staleness-{time.strftime('%Y%m%d-%H%M%S')}")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[Key, list[list[float]]] = {}
    scores: dict[Key, dict[int, float]] = {}
    for seed in args.seeds:  # seed-major: an interrupted run still has every setting at the first seeds
        for s in args.s:
            for obj in args.objectives:
                t0 = time.time()
                rewards = metric(run_one(obj, s, seed, args.steps, out, extra), "reward_mean")
                curves.setdefault((obj, s), []).append(rewards)
                scores.setdefault((obj, s), {})[seed] = last_half(rewards)
                print(f"{obj:>16} s={s:<3} seed={seed:<3} last-half reward {last_half(rewards):.3f}  "
                      f"({time.time() - t0:.0f} s)", flush=True)
    text = table(scores, args.objectives, args.s)
    (out / "staleness.md").write_text(text + "\n")
    (out / "scores.json").write_text(json.dumps(
        {f"{o}|{s}": {str(k): v for k, v in per_seed.items()} for (o, s), per_seed in scores.items()}, indent=1))
    plot(curves, args.objectives, args.s, out / "staleness.png")
    print(text)
    print(f"plot: {out / 'staleness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
