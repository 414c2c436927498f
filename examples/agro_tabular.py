"""AGRO's Figure 1, reproduced with Relay's own loss functions: a K-armed bandit, fully off-policy.

Why a bandit: with one token per generation (T = 1, logp = log_softmax(theta)[action])
the optimum pi* = softmax(log ref + r / beta) is known in closed form, so
KL(pi, pi*) measures exactly how far each objective's fixed point is from the
regularised optimum. Every batch is sampled from mu = ref, never from pi: AGRO's
consistency loss still reaches pi*, KL-regularised policy gradient does not.

    python -m examples.agro_tabular --steps 4000 --out agro_tabular.png   # from the repo root
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from learner.objectives import LossInputs, ObjectiveConfig, compute_loss


@dataclass(frozen=True)
class Bandit:
    """K actions with fixed rewards, a reference policy, and the regularised optimum."""

    rewards: torch.Tensor  # (K,)
    ref_logp: torch.Tensor  # (K,)
    beta: float

    @property
    def optimum_logp(self) -> torch.Tensor:
        return torch.log_softmax(self.ref_logp + self.rewards / self.beta, dim=0)  # (K,)

    def kl_to_optimum(self, logp: torch.Tensor) -> float:
        """KL(pi, pi*) for pi = exp(logp)."""
        return float((logp.exp() * (logp - self.optimum_logp)).sum())


def make_bandit(num_actions: int = 10, beta: float = 0.1, seed: int = 0) -> Bandit:
    """r ~ N(0, 1), ref = softmax(N(0, 1) logits), as in ALGORITHMS.md's tabular check."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(num_actions, generator=gen, dtype=torch.float64)  # (K,)
    ref_logp = torch.log_softmax(torch.randn(num_actions, generator=gen, dtype=torch.float64), dim=0)  # (K,)
    return Bandit(rewards, ref_logp, beta)


def train(
    bandit: Bandit,
    cfg: ObjectiveConfig,
    *,
    steps: int,
    lr: float,
    group_size: int = 16,
    seed: int = 0,
    sample_from: str = "ref",
) -> list[float]:
    """SGD on theta with compute_loss(cfg) over groups of single-token generations; normalised KL per step.

    sample_from="ref" is the fully off-policy setting of Figure 1; "pi" samples the
    current policy (for the on-policy variant).
    """
    gen = torch.Generator().manual_seed(seed)
    theta = bandit.ref_logp.clone().requires_grad_(True)  # (K,) pi_0 = ref
    optimiser = torch.optim.SGD([theta], lr=lr)
    kl0 = bandit.kl_to_optimum(bandit.ref_logp)
    group_ids = torch.zeros(group_size, dtype=torch.long)  # (n,) one prompt
    curve = []
    for _ in range(steps):
        logp_all = torch.log_softmax(theta, dim=0)  # (K,)
        mu_logp = bandit.ref_logp if sample_from == "ref" else logp_all.detach()  # (K,)
        actions = torch.multinomial(mu_logp.exp(), group_size, replacement=True, generator=gen)  # (n,)
        inp = LossInputs(
            logp=logp_all[actions][:, None],  # (n, 1)
            behaviour_logp=mu_logp[actions][:, None],  # (n, 1)
            mask=torch.ones(group_size, 1, dtype=theta.dtype),  # (n, 1)
            rewards=bandit.rewards[actions],  # (n,)
            group_ids=group_ids,
            ref_logp=bandit.ref_logp[actions][:, None],  # (n, 1)
        )
        loss, _ = compute_loss(cfg, inp)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        curve.append(bandit.kl_to_optimum(torch.log_softmax(theta.detach(), dim=0)) / kl0)
    return curve


def figure_one(steps: int, lr: float = 1.0, seed: int = 0, beta: float = 0.1) -> dict[str, list[float]]:
    """Normalised KL(pi, pi*) curves for AGRO and KL-regularised PG on data from ref."""
    bandit = make_bandit(beta=beta, seed=seed)
    configs = {
        "AGRO": ObjectiveConfig(name="agro", beta=beta),
        "KL-regularised PG (k2)": ObjectiveConfig(name="kl_pg", beta=beta, kl_estimator="k2"),
    }
    return {label: train(bandit, cfg, steps=steps, lr=lr, seed=seed) for label, cfg in configs.items()}


def plot(curves: dict[str, list[float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Below ~1e-16 the float64 KL is round-off, sometimes negative; pin it to the floor for the log axis.
    floor = 1e-16
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [max(v, floor) for v in curve], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (16 generations from ref per step)")
    ax.set_ylabel("KL(pi, pi*) / KL(pi_0, pi*)  (floor 1e-16)")
    ax.set_title("Tabular bandit, fully off-policy data (AGRO Fig. 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="SGD steps per objective")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate on the logits")
    parser.add_argument("--seed", type=int, default=0, help="bandit and sampling seed")
    parser.add_argument("--out", default="agro_tabular.png", help="where to write the PNG")
    args = parser.parse_args()
    curves = figure_one(args.steps, lr=args.lr, seed=args.seed)
    for label, curve in curves.items():
        print(f"{label}: final KL(pi, pi*)/KL(pi_0, pi*) = {curve[-1]:.3g}")
    plot(curves, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
