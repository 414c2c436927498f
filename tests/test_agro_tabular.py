"""AGRO's Figure 1 with the project's own `agro` and `kl_pg` losses: a bandit trained on data from ref only."""

from __future__ import annotations

import torch

from examples.agro_tabular import figure_one, make_bandit, train
from learner.objectives import ObjectiveConfig


def test_agro_reaches_the_optimum_off_policy_and_kl_pg_does_not():
    curves = figure_one(steps=1500, lr=1.0, seed=0)
    agro, kl_pg = curves["AGRO"], curves["KL-regularised PG (k2)"]
    assert agro[-1] < 0.05, f"AGRO KL(pi, pi*)/KL(pi_0, pi*) = {agro[-1]:.3g}"
    assert min(kl_pg[-300:]) > 0.15, f"KL-PG KL(pi, pi*)/KL(pi_0, pi*) = {kl_pg[-1]:.3g}"


def test_agro_on_policy_reaches_the_optimum_on_its_own_samples():
    bandit = make_bandit(seed=0)
    curve = train(bandit, ObjectiveConfig(name="agro_on_policy", beta=0.1), steps=1000, lr=1.0, sample_from="pi")
    assert curve[-1] < 0.05, f"on-policy AGRO KL ratio = {curve[-1]:.3g}"


def test_bandit_optimum_is_the_closed_form():
    bandit = make_bandit(num_actions=5, beta=0.5, seed=1)
    star = bandit.optimum_logp.exp()
    expected = bandit.ref_logp.exp() * torch.exp(bandit.rewards / 0.5)
    torch.testing.assert_close(star, expected / expected.sum())
    assert bandit.kl_to_optimum(bandit.optimum_logp) == 0.0
