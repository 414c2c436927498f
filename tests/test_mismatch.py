"""The train/inference mismatch alarm: a real vLLM generator and a DeepSpeed learner in one process. Tokens the
generator sampled with the learner's own weights get the learner's log-probs back (mismatch ~0); a generator that
says it serves a newer version but kept the old weights (an update that never loaded) trips the alarm, naming it."""
from __future__ import annotations

import pytest
import torch

from learner.mismatch import MismatchError, by_generator, judge, token_mismatch

pytestmark = pytest.mark.slow


def test_the_measure_counts_only_tokens_of_the_learners_version_and_skips_missing_behaviour():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])  # (B, T)
    behaviour = torch.tensor([[-1.5, -2.0, float("nan")], [-1.0, -3.0, 0.0]])
    same = torch.tensor([[True, True, True], [False, True, False]])
    rows = token_mismatch(logp, behaviour, same)  # (B, 3)
    assert torch.allclose(rows[0], torch.tensor([0.5, (torch.exp(torch.tensor(0.5)) - 1.5).item(), 2.0]))
    assert rows[1, 2] == 1 and torch.isclose(rows[1, 0], torch.tensor(2.0))
    per = by_generator(rows, ["gen-0", "gen-1"])
    assert per["gen-0"]["abs_mean"] == pytest.approx(0.25) and per["gen-1"]["abs_mean"] == pytest.approx(2.0)
    assert [g for g, _ in judge(per, warn=0.1, abort=None, step=3)] == ["gen-1", "gen-0"]  # worst first
    with pytest.raises(MismatchError, match="generator gen-1: at learner step 3"):
        judge(per, warn=0.1, abort=1.0, step=3)


def test_a_generator_that_kept_old_weights_trips_the_alarm(tiny_model_dir, dist_env):
    from actors.config import ActorConfig
    from actors.generator import Generator, Prompt
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.objectives import ObjectiveConfig

    prompts = [Prompt(f"p{i}", f"{i}+{j}=", str(i + j)) for i, j in [(1, 2), (3, 1), (2, 2), (4, 0)]]
    gen = Generator(ActorConfig(n=4, max_tokens=6, temperature=0.7), tiny_model_dir, "gen-stale", max_model_len=64)
    cfg = LearnerConfig(groups_per_step=4, micro_batch_groups=4, lr=3e-2, objective=ObjectiveConfig(max_len=6))
    learner = Learner(cfg, tiny_model_dir, group_size=4, temperature=0.7)

    metrics = learner.train_step(gen.generate(prompts).batch)  # version 0 sampled, learner at 0: the same weights
    honest = learner.mismatch["gen-stale"]
    assert honest["tokens"] > 0 and metrics["mismatch_tokens"] == honest["tokens"]
    assert honest["abs_mean"] < 1e-4, honest  # vLLM and the learner agree on fp32 CPU, at temperature 0.7
    assert judge(learner.mismatch, cfg.mismatch_warn, 1e-3, learner.step) == []

    for _ in range(3):  # the learner moves on; the generator never loads the new weights...
        learner.train_step(gen.generate(prompts).batch)
    gen.version = learner.step  # ...but labels its samples with the version it was offered
    learner.train_step(gen.generate(prompts).batch)
    stale = learner.mismatch["gen-stale"]
    assert stale["tokens"] > 0 and stale["abs_mean"] > 100 * max(honest["abs_mean"], 1e-6), (honest, stale)
    assert [g for g, _ in judge(learner.mismatch, 1e-3, None, learner.step)] == ["gen-stale"]
    with pytest.raises(MismatchError, match="generator gen-stale"):
        judge(learner.mismatch, 1e-3, stale["abs_mean"] / 2, learner.step)
    gen.close()
