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


def test_full_variance_gradient_under_pi_collapses():
    """Why agro_on_policy keeps only the pathwise term (its docstring, step 1): the exact gradient of
    (1/2) Var_{y~pi} R_pi(y), likelihood-ratio part included, sends pi to one action, not to pi*."""
    bandit = make_bandit(seed=1)
    theta = bandit.ref_logp.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([theta], lr=1.0)
    for _ in range(3000):
        logp = torch.log_softmax(theta, dim=0)
        regularised = bandit.rewards - bandit.beta * (logp - bandit.ref_logp)
        value = (logp.exp() * regularised).sum()
        loss = 0.5 * (logp.exp() * (regularised - value) ** 2).sum() / bandit.beta
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    logp = torch.log_softmax(theta.detach(), dim=0)
    assert logp.exp().max() > 0.999
    assert bandit.kl_to_optimum(logp) / bandit.kl_to_optimum(bandit.ref_logp) > 0.5
