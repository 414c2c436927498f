"""A quarter of every batch from offline correct answers, three quarters online, against online only (agro).

The offline source is written here: for every task prompt a+b one group of `--group` rows, the correct sum
(reward 1) and `--group - 1` distinct wrong sums (reward 0), `behaviour: none` (no policy produced them; agro
never reads behaviour log-probs). The wrong rows are there because every objective here is group-relative: a
group whose rows all score 1 has advantage 0 everywhere and teaches nothing. `data.offline_fraction: 0.25`
makes 4 of the default 16 groups per step offline. The curves are the reward of the *online* samples (the
run's rollout log, by the policy version that generated them; the mixed run's own reward_mean would include
the offline rows), and each run's final policy is scored by examples/policy_eval.py (reward and KL(pi || ref)).

    python -m examples.mixed_offline                         # agro beta 0.1, 600 steps, two runs
    python -m examples.mixed_offline --beta 0.01 --steps 300 --out runs/mixed-b0.01
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import yaml

from examples.policy_eval import reference_dir, score
from examples.runs import smooth, train
from launch.config import RunConfig


def write_expert(path: Path, max_operand: int, group: int, seed: int = 0) -> Path:
    """One group per prompt: the right sum (reward 1.0) and group - 1 distinct wrong sums (reward 0.0)."""
    rng = random.Random(seed)
    rows = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            wrong = rng.sample([v for v in range(2 * max_operand + 1) if v != a + b], group - 1)
            for value in [a + b, *wrong]:
                rows.append({"prompt": f"{a}+{b}=", "response": str(value), "reward": float(value == a + b),
                             "group_id": f"expert-{a}+{b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_curve(run_dir: Path, source: str = "arithmetic") -> tuple[list[int], list[float]]:
    """(policy versions, mean reward of the online rollouts each generated), in version order, from the rollout
    log. Not every version generates: a request spans more than one learner step when fewer online groups are
    trained per step, so the curve is indexed by the version itself."""
    from buffer.rollout_log import read_log

    table = read_log(str(run_dir / "rollouts"))
    by_version: dict[int, list[float]] = {}
    for v, r, s in zip(table.column("policy_version").to_pylist(), table.column("reward").to_pylist(),
                       table.column("data_source").to_pylist()):
        if s == source:
            by_version.setdefault(v, []).append(r)
    versions = sorted(by_version)
    return versions, [sum(by_version[v]) / len(by_version[v]) for v in versions]


def halves(versions: list[int], values: list[float], steps: int) -> tuple[float, float]:
    """Mean of the per-version rewards over the first and over the second half of the run's versions."""
    first = [y for v, y in zip(versions, values) if v < steps // 2]
    last = [y for v, y in zip(versions, values) if v >= steps // 2]
    return sum(first) / max(len(first), 1), sum(last) / max(len(last), 1)


def plot(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, smooth(ys), label=label)
    ax.set_title("Reward of the online samples")
    ax.set_xlabel("policy version that generated them")
    ax.set_ylabel("reward (rolling mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.mixed_offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="agro")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--fraction", type=float, default=0.25, help="data.offline_fraction of the mixed run")
    parser.add_argument("--group", type=int, default=8, help="rows per offline group (one of them correct)")
    parser.add_argument("--max-operand", type=int, default=9, help="the task's data.max_operand")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt when scoring the final policy")
    parser.add_argument("--out", default=f"runs/mixed-offline-{time.strftime('%Y%m%d-%H%M%S')}")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    expert = write_expert(out / "expert.jsonl", args.max_operand, args.group)
    common = ["--learner.total_steps", str(args.steps), "--learner.checkpoint_every", "0",
              "--learner.objective.name", args.objective, "--learner.objective.beta", str(args.beta),
              "--data.max_operand", str(args.max_operand)]
    source = json.dumps([{"path": str(expert), "behaviour": "none", "source": "expert"}])
    runs = {"online only": train(out / "online", common, extra),
            f"{args.fraction:.0%} offline": train(out / "mixed", common + [
                "--data.offline_fraction", str(args.fraction), "--data.offline", source], extra)}
    curves, lines = {}, ["| run | online reward, first half | online reward, last half | final policy reward "
                         "| final KL(pi, ref) |", "|---|---|---|---|---|"]
    for label, run in runs.items():
        cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
        final = score(run / "final", reference_dir(cfg), cfg, n=args.samples)
        curves[label] = online_curve(run)
        first, last = halves(*curves[label], args.steps)
        lines.append(f"| {label} ({args.objective} beta={args.beta:g}) | {first:.3f} | {last:.3f} | "
                     f"{final.reward:.3f} | {final.kl:.3f} |")
        print(f"{label:>14}: online last-half reward {last:.3f}, final policy {final.reward:.3f} "
              f"(KL {final.kl:.3f})", flush=True)
    text = "\n".join(lines)
    (out / "mixed_offline.md").write_text(text + "\n")
    plot(curves, out / "mixed_offline.png")
    print(text)
    print(f"plot: {out / 'mixed_offline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
