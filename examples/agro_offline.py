"""AGRO against KL-regularised policy gradient on purely offline data: the AGRO paper's Figure 5 on the toy task.

1. Reference rollouts, generated once: a run whose generator never receives new weights
   (`learner.publish_every` > its steps, `buffer.max_staleness` to match), so every stored rollout is a sample
   of the warm-started initial policy, which is also every later run's reference model; `launch.export` writes
   them to Parquet, and the example checks that every token's policy version is 0.
2. Purely offline runs on that file (`data.offline_fraction: 1.0`, `behaviour: recorded`: no rollout actor),
   agro and kl_pg at each beta, saving the weights every `--every` steps.
3. Each saved policy scored by examples/policy_eval.py: sampled reward on every task prompt and the exact
   sequence KL(pi || ref) (an offline run's own reward_mean is the recorded rows' reward, not its policy's),
   and the share of its samples that the offline data never holds for that prompt ("off-support").
The optimum of E[r] - beta KL(pi || ref) is pi* = ref exp(r / beta) / Z, so with a 0/1 reward and p the reference's
success rate on a prompt (estimated from the exported rows), pi* answers correctly with probability
p e^(1/beta) / (p e^(1/beta) + 1 - p); the table lists that reward and KL(pi* || ref) as the fixed point.

    python -m examples.agro_offline                         # betas 0.1 and 1.0, 400 steps, ~10 min on 2 cores
    python -m examples.agro_offline --betas 0.3 --steps 200 --out runs/agro-offline-b0.3
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from examples.policy_eval import Score, score_run, support_of
from examples.runs import train

OBJECTIVES = ["agro", "kl_pg"]


def reference_rollouts(out: Path, steps: int, extra: list[str]) -> Path:
    """Generate with the initial policy only, export, and check that it is so; returns the Parquet file."""
    import pyarrow.parquet as pq

    from launch.export import export

    parquet = out / "ref.parquet"
    if not parquet.exists():
        # no publish within the run: the generator serves version 0 (the initial policy) throughout
        run = train(out / "refgen", ["--learner.total_steps", str(steps), "--learner.checkpoint_every", "0",
                                     "--learner.publish_every", str(steps + 1), "--buffer.max_staleness", str(steps)],
                    extra)
        export(run, parquet)
    versions = {v for row in pq.read_table(parquet, columns=["token_versions"]).column(0).to_pylist() for v in row}
    if versions != {0}:
        raise RuntimeError(f"{parquet}: rollouts of policy versions {sorted(versions)}, not only the reference's (0)")
    return parquet


def offline_run(out: Path, parquet: Path, name: str, beta: float, steps: int, every: int, extra: list[str]) -> Path:
    source = json.dumps([{"path": str(parquet), "behaviour": "recorded"}])
    return train(out / f"{name}-b{beta:g}", [
        "--learner.total_steps", str(steps), "--learner.checkpoint_every", str(every),
        "--learner.checkpoint_keep", str(steps // every + 1), "--learner.objective.name", name,
        "--learner.objective.beta", str(beta), "--data.offline_fraction", "1.0", "--data.offline", source], extra)


def scored(run: Path, samples: int, support: dict[str, set[str]]) -> list[tuple[int, Score]]:
    """score_run, kept in the run's directory: a rerun of the example redraws without sampling again."""
    cache = run / f"policy_scores-n{samples}.json"
    if cache.exists():
        return [(p.pop("step"), Score(**p)) for p in json.loads(cache.read_text())]
    points = score_run(run, n=samples, support=support)
    cache.write_text(json.dumps([{"step": s, **vars(sc)} for s, sc in points]))
    return points


def fixed_point(parquet: Path, beta: float) -> tuple[float, float]:
    """Reward and KL(pi* || ref) of pi* = ref exp(r / beta) / Z, per prompt from its reference success rate."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["prompt_id", "reward"])
    per_prompt: dict[str, list[float]] = {}
    for pid, r in zip(table.column("prompt_id").to_pylist(), table.column("reward").to_pylist()):
        per_prompt.setdefault(pid, []).append(r)
    rewards, kls = [], []
    for rs in per_prompt.values():
        p = sum(rs) / len(rs)
        # log Z = log(p e^(1/beta) + 1 - p), in log space: e^(1/beta) overflows for beta below ~1/700
        terms = ([math.log(p) + 1.0 / beta] if p > 0 else []) + ([math.log1p(-p)] if p < 1 else [])
        log_z = max(terms) + math.log(sum(math.exp(t - max(terms)) for t in terms))
        right = math.exp(math.log(p) + 1.0 / beta - log_z) if p > 0 else 0.0
        rewards.append(right)
        kls.append(right / beta - log_z)
    return sum(rewards) / len(rewards), sum(kls) / len(kls)


def table(curves: dict[tuple[str, float], list[tuple[int, Score]]], optimum: dict[float, tuple[float, float]]) -> str:
    lines = ["| objective | beta | reward (ref) | reward (last) | best reward | KL to ref (last) | off-support (last) "
             "| pi* reward | KL(pi*, ref) |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, beta), points in curves.items():
        first, last = points[0][1], points[-1][1]
        best = max(s.reward for _, s in points)
        lines.append(f"| {name} | {beta:g} | {first.reward:.3f} | {last.reward:.3f} | {best:.3f} | {last.kl:.3f} | "
                     f"{last.off_support:.1%} | {optimum[beta][0]:.3f} | {optimum[beta][1]:.3f} |")
    return "\n".join(lines)


def plot(curves: dict[tuple[str, float], list[tuple[int, Score]]], optimum: dict[float, tuple[float, float]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
    betas = sorted({b for _, b in curves})
    for (name, beta), points in curves.items():
        steps = [s for s, _ in points]
        style = {"color": f"C{betas.index(beta)}", "marker": "o", "markersize": 3,
                 "linestyle": "-" if name == "agro" else "--", "label": f"{name} beta={beta:g}"}
        axes[0].plot(steps, [s.reward for _, s in points], **style)
        axes[1].plot(steps, [s.kl for _, s in points], **style)
        axes[2].plot(steps, [s.off_support for _, s in points], **style)
        axes[3].plot([s.kl for _, s in points], [s.reward for _, s in points], **style)
    for beta in betas:  # the fixed point pi* of E[r] - beta KL: its reward (dotted)
        axes[0].axhline(optimum[beta][0], color=f"C{betas.index(beta)}", linestyle=":", linewidth=1,
                        label=f"pi* reward, beta={beta:g}")
    for ax, (title, xl, yl) in zip(axes, [("Reward of the policy (sampled)", "learner step", "reward"),
                                          ("KL(pi || ref)", "learner step", "nats / sequence"),
                                          ("Samples outside the offline data", "learner step", "share"),
                                          ("Reward against KL", "KL(pi || ref)", "reward")]):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[3].set_xscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=7)
    fig.suptitle("Purely offline learning from reference rollouts (solid: agro, dashed: kl_pg)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.agro_offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--steps", type=int, default=400, help="learner steps of each offline run")
    parser.add_argument("--every", type=int, default=50, help="save and score the policy every this many steps")
    parser.add_argument("--gen-steps", type=int, default=60, help="steps of the reference-rollout run")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt when scoring a policy")
    parser.add_argument("--out", default=f"runs/agro-offline-{time.strftime('%Y%m%d-%H%M%S')}")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parquet = reference_rollouts(out, args.gen_steps, extra)
    support = support_of(parquet)
    curves, optimum = {}, {}
    for beta in args.betas:
        optimum[beta] = fixed_point(parquet, beta)
        for name in args.objectives:
            t0 = time.time()
            run = offline_run(out, parquet, name, beta, args.steps, args.every, extra)
            curves[(name, beta)] = scored(run, args.samples, support)
            last = curves[(name, beta)][-1][1]
            print(f"{name:>6} beta={beta:<5g} reward {last.reward:.3f}  KL {last.kl:.3f}  ({time.time() - t0:.0f} s)",
                  flush=True)
    text = table(curves, optimum)
    (out / "agro_offline.md").write_text(text + "\n")
    (out / "scores.json").write_text(json.dumps(
        {f"{n}|{b:g}": [{"step": s, **vars(sc)} for s, sc in pts] for (n, b), pts in curves.items()}, indent=1))
    plot(curves, optimum, out / "agro_offline.png")
    print(text)
    print(f"plot: {out / 'agro_offline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
