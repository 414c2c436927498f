"""RL against tiny learned judges, the seeds' setups in miniature: semi-online DPO with a reward model at sync
periods s = 1, 4 and infinity (configs/semi_online_dpo_rm.yaml), and online IPO with a preference model
(configs/online_ipo_pm.yaml). Each run is its own `launch.train` process; the judges have no path in the configs,
so the first run builds them (seconds to minutes on a loaded CPU) and the others reuse them from <out>/_out/_models.

Reported per run, first fifth of the steps against the last: the reward under the judge (for the preference model
a win rate inside the group, 1/2 on average by construction, so the preference run reports its win rate against
the starting policy under the judge instead), and the true accuracy of the rollouts (the rollout log's responses
scored by the exact `arithmetic` rule; at s = infinity they are all the starting policy's), and the true accuracy
of 200 samples (8 per problem) of the starting and of the final policy. Writes <out>/judged_rl.png (reward and true
accuracy per step) and <out>/judged_rl.md.

    python -m examples.judged_rl                 # 4 runs of 150 steps
    python -m examples.judged_rl --steps 60 --runs dpo-s1 ipo
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from examples.judged_eval import (accuracy_by_version, first_last, sampled_accuracy, train_rewards, true_accuracy,
                                  win_rate)
from examples.runs import smooth

RUNS = {  # name: (config, overrides besides the steps)
    "dpo-s1": ("semi_online_dpo_rm.yaml", []),
    "dpo-s4": ("semi_online_dpo_rm.yaml", ["--learner.publish_every", "4", "--buffer.max_staleness", "4"]),
    "dpo-sinf": ("semi_online_dpo_rm.yaml", ["--learner.publish_every", "never", "--buffer.max_staleness", "{steps}"]),
    "ipo": ("online_ipo_pm.yaml", []),
}


def run_one(name: str, steps: int, out: Path, extra: list[str]) -> Path:
    """One training run as its own process (its own Ray); returns its run directory (reused when complete)."""
    config, overrides = RUNS[name]
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return run_dir
    args = [sys.executable, "-m", "launch.train", "--config", f"configs/{config}", "--learner.total_steps",
            str(steps), "--output_dir", str(out / "_out"), "--run-dir", str(run_dir)]
    subprocess.run(args + [o.format(steps=steps) for o in overrides] + extra, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def built(run_dir: Path) -> tuple[str, dict[str, str]]:
    """The starting policy and the judges a run used: the launcher's cached builds for its config.yaml (found,
    not rebuilt: the same recipe names the same directory)."""
    from launch.config import load_config
    from launch.data import prompt_format
    from launch.model import build_default_model
    from launch.judge_build import build_missing_judges

    cfg = load_config(str(run_dir / "config.yaml"))
    cache = Path(cfg.output_dir) / "_models"
    policy = build_default_model(cfg.model, cfg.data.max_operand, cache, prompt_format(cfg.data))
    rewards, _ = build_missing_judges(cfg, cache)
    return policy, {name: m.path for name, m in rewards.models.items()}


def score(name: str, run_dir: Path) -> dict:
    acc = true_accuracy(run_dir)
    start, judges = built(run_dir)
    row = {"accuracy_first": acc[0], "accuracy_last": acc[1], "policy_accuracy_start": sampled_accuracy(start, 4),
           "policy_accuracy_final": sampled_accuracy(str(run_dir / "final"), 4)}
    if name == "ipo":
        row["win_rate_vs_start"] = win_rate(judges["pm"], str(run_dir / "final"), start, max_operand=4)
    else:
        row["reward_first"], row["reward_last"] = first_last(train_rewards(run_dir))
    return row


def table(rows: dict[str, dict]) -> str:
    lines = ["| run | reward under the judge: first fifth -> last fifth | true accuracy of the rollouts: first fifth "
             "-> last fifth | true accuracy of the policy: start -> final |", "|---|---|---|---|"]
    for name, r in rows.items():
        judged = (f"win rate vs the starting policy {r['win_rate_vs_start']:.2f}" if "win_rate_vs_start" in r
                  else f"{r['reward_first']:+.2f} -> {r['reward_last']:+.2f}")
        lines.append(f"| {name} | {judged} | {r['accuracy_first']:.2f} -> {r['accuracy_last']:.2f} | "
                     f"{r['policy_accuracy_start']:.2f} -> {r['policy_accuracy_final']:.2f} |")
    return "\n".join(lines)


def plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run_dir in runs.items():
        if name != "ipo":  # a preference reward averages 1/2 in every group
            ax_r.plot(smooth(train_rewards(run_dir), 15), label=name)
        by_version = accuracy_by_version(run_dir)
        versions = sorted(by_version)
        acc = [sum(by_version[v]) / len(by_version[v]) for v in versions]
        ax_a.plot(versions, smooth(acc, 15), label=name)
    ax_r.set(title="reward under the scalar judge (rolling mean)", xlabel="learner step", ylabel="judge logit")
    ax_a.set(title="true accuracy of the rollouts (rolling mean)", xlabel="policy version sampled",
             ylabel="exact-match accuracy")
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.judged_rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=f"runs/judged-rl-{time.strftime('%Y%m%d-%H%M%S')}")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = {}, {}
    for name in args.runs:
        t0 = time.time()
        runs[name] = run_one(name, args.steps, out, extra)
        rows[name] = score(name, runs[name])
        print(f"{name:>9}: {json.dumps({k: round(v, 3) for k, v in rows[name].items()})} ({time.time() - t0:.0f} s)",
              flush=True)
    text = table(rows)
    (out / "judged_rl.md").write_text(text + "\n")
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    plot(runs, out / "judged_rl.png")
    print(text)
    print(f"plot: {out / 'judged_rl.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
