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

from examples.policy_eval import Score, reference_dir, score
from launch.config import RunConfig

RUN = re.compile(r"^(?P<obj>.+)-s(?P<s>\d+)$")


def score_final(run_dir: Path, n: int, with_reference: bool) -> tuple[Score, Score | None]:
    """The run's final policy scored on every task prompt, and (with_reference) its reference policy too."""
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    ref = reference_dir(cfg)
    return score(run_dir / "final", ref, cfg, n=n), score(ref, ref, cfg, n=n) if with_reference else None


def table(scores: dict[tuple[str, int], Score], base: float) -> str:
    lines = ["| objective | s | final reward | KL(pi, ref) | reward gained per nat |", "|---|---|---|---|---|"]
    for (obj, s), sc in sorted(scores.items()):
        per_nat = (sc.reward - base) / sc.kl if sc.kl > 1e-6 else float("nan")
        lines.append(f"| {obj} | {s} | {sc.reward:.3f} | {sc.kl:.3f} | {per_nat:.2f} |")
    return "\n".join(lines)


def plot(scores: dict[tuple[str, int], Score], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    objectives = sorted({o for o, _ in scores})
    markers = {0: "o", 4: "s", 8: "D", 16: "^"}
    for i, obj in enumerate(objectives):
        pts = sorted((s, sc) for (o, s), sc in scores.items() if o == obj)
        ax.plot([sc.kl for _, sc in pts], [sc.reward for _, sc in pts], color=f"C{i}", alpha=0.4)
        for s, sc in pts:
            ax.scatter(sc.kl, sc.reward, color=f"C{i}", marker=markers.get(s, "x"), label=obj if s == pts[0][0] else None)
            ax.annotate(f"s={s}", (sc.kl, sc.reward), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base, color="grey", linestyle=":", label="reference policy")
    ax.set_xscale("log")
    ax.set_xlabel("KL(pi || ref) of the final policy (nats / sequence)")
    ax.set_ylabel("reward of the final policy (sampled)")
    ax.set_title("Reward bought per KL, by objective and sync period s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.staleness_kl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="output directories of examples.staleness")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--out", default=None, help="where the table and plot go (default: the first dir)")
    args = parser.parse_args(argv)
    scores, base = {}, None
    for d in args.dirs:
        for run in sorted(p for p in Path(d).iterdir() if RUN.match(p.name) and (p / "final").is_dir()):
            m = RUN.match(run.name)
            final, ref = score_final(run, args.samples, with_reference=base is None)  # every run: the same reference
            scores[(m["obj"].replace("-b", ":"), int(m["s"]))] = final
            base = ref.reward if ref is not None else base
            print(f"{run.name:>20}: reward {final.reward:.3f}  KL {final.kl:.3f}", flush=True)
    if not scores:
        print(f"no finished runs (<objective>-s<k>/final) under {args.dirs}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    text = table(scores, base) + f"\n\nreference policy: reward {base:.3f}\n"
    (out / "staleness_kl.md").write_text(text)
    (out / "staleness_kl.json").write_text(json.dumps({f"{o}|{s}": vars(sc) for (o, s), sc in scores.items()}, indent=1))
    plot(scores, base, out / "staleness_kl.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
