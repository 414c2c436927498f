"""Reward against KL to the reference for the runs of `examples.staleness`: where AGRO's claim is about.

`examples.staleness` scores a run by its reward over the last half of training, i.e. by learning speed. AGRO's
claim is about where it converges and what it pays in KL(pi || ref) for its reward. This scores every run's final
policy with examples/policy_eval.py (sampled reward on every task prompt, exact sequence KL to the reference) and
reports the reward gained over the reference per nat of KL, by objective and sync period s.

    python -m examples.staleness_kl runs/staleness-20261130-...  [more staleness output dirs]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from examples.policy_eval import Score, checkpoint_dirs, reference_dir, score
from launch.config import RunConfig

RUN = re.compile(r"^(?P<obj>.+)-s(?P<s>\d+)$")


def score_final(run_dir: Path, n: int, with_reference: bool) -> tuple[Score, Score | None]:
    """The run's final policy scored on every task prompt, and (with_reference) its reference policy too."""
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    ref = reference_dir(cfg)
    return score(run_dir / "final", ref, cfg, n=n), score(ref, ref, cfg, n=n) if with_reference else None


def trajectory(run_dir: Path, n: int) -> list[tuple[int, Score]]:
    """The run's kept checkpoints scored (none when it kept none): its path in (KL, reward) on the way there."""
    if not (run_dir / "checkpoints").is_dir():
        return []
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    ref = reference_dir(cfg)
    return [(step, score(path, ref, cfg, n=n)) for step, path in checkpoint_dirs(run_dir)]


def table(scores: dict[tuple[str, int], Score], base: float) -> str:
    lines = ["| objective | s | final reward | KL(pi, ref) | reward gained per nat |", "|---|---|---|---|---|"]
    for (obj, s), sc in sorted(scores.items()):
        per_nat = (sc.reward - base) / sc.kl if sc.kl > 1e-6 else float("nan")
        lines.append(f"| {obj} | {s} | {sc.reward:.3f} | {sc.kl:.3f} | {per_nat:.2f} |")
    return "\n".join(lines)


def plot(scores: dict[tuple[str, int], Score], paths: dict[tuple[str, int], list[tuple[int, Score]]], base: float,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    objectives = sorted({o for o, _ in scores})
    markers = {0: "o", 4: "s", 8: "D", 16: "^"}
    for i, obj in enumerate(objectives):
        pts = sorted((s, sc) for (o, s), sc in scores.items() if o == obj)
        ax.plot([sc.kl for _, sc in pts], [sc.reward for _, sc in pts], color=plt.cm.tab20(i % 20), alpha=0.4)
        for s, sc in pts:
            ax.scatter(sc.kl, sc.reward, color=plt.cm.tab20(i % 20), marker=markers.get(s, "x"), label=obj if s == pts[0][0] else None)
            ax.annotate(f"s={s}", (sc.kl, sc.reward), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if paths.get((obj, s)):  # checkpoints on the way: a dotted path from the reference to the final point
                pts_path = [(0.0, base)] + [(p.kl, p.reward) for _, p in paths[(obj, s)]]
                ax.plot(*zip(*pts_path), color=plt.cm.tab20(i % 20), linestyle=":", marker=".", linewidth=1)
    ax.axhline(base, color="grey", linestyle=":", label="reference policy")
    ax.set_xlim(left=0)
    ax.set_xlabel("KL(pi || ref) of the final policy (nats / sequence)")
    ax.set_ylabel("reward of the final policy (sampled)")
    ax.set_title("Reward bought per KL, by objective and sync period s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def collect(dirs: list[str], samples: int) -> tuple[dict, dict, float | None]:
    """Score every finished run under `dirs`: (final scores, checkpoint paths, the reference's reward)."""
    scores, paths, base = {}, {}, None
    for d in dirs:
        for run in sorted(p for p in Path(d).iterdir() if RUN.match(p.name) and (p / "final").is_dir()):
            m = RUN.match(run.name)
            final, ref = score_final(run, samples, with_reference=base is None)  # every run: the same reference
            key = (m["obj"].replace("-b", ":"), int(m["s"]))
            if key in scores:  # the same run name in another output dir (other overrides): tell them apart
                key = (f"{key[0]} [{Path(d).name}]", key[1])
            scores[key], paths[key] = final, trajectory(run, samples)
            base = ref.reward if ref is not None else base
            print(f"{run.name:>20}: reward {final.reward:.3f}  KL {final.kl:.3f}", flush=True)
    return scores, paths, base


def load(path: Path) -> tuple[dict, dict, float]:
    """What a previous invocation wrote to staleness_kl.json, to redraw without sampling again."""
    raw = json.loads(path.read_text())
    scores, paths = {}, {}
    for key, entry in raw["runs"].items():
        obj, s = key.rsplit("|", 1)
        points = entry.pop("checkpoints")
        scores[(obj, int(s))] = Score(**entry)
        paths[(obj, int(s))] = [(p.pop("step"), Score(**p)) for p in points]
    return scores, paths, raw["reference_reward"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.staleness_kl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="output directories of examples.staleness")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--out", default=None, help="where the table and plot go (default: the first dir)")
    parser.add_argument("--redraw", action="store_true", help="redraw from the out dir's staleness_kl.json")
    args = parser.parse_args(argv)
    out = Path(args.out or args.dirs[0])
    if args.redraw:
        scores, paths, base = load(out / "staleness_kl.json")
    else:
        scores, paths, base = collect(args.dirs, args.samples)
    if not scores:
        print(f"no finished runs (<objective>-s<k>/final) under {args.dirs}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    text = table(scores, base) + f"\n\nreference policy: reward {base:.3f}\n"
    (out / "staleness_kl.md").write_text(text)
    runs = {f"{o}|{s}": {**vars(sc), "checkpoints": [{"step": st, **vars(p)} for st, p in paths[(o, s)]]}
            for (o, s), sc in scores.items()}
    (out / "staleness_kl.json").write_text(json.dumps({"reference_reward": base, "runs": runs}, indent=1))
    plot(scores, paths, base, out / "staleness_kl.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
