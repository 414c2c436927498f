"""examples.staleness over seeds: the table's mean ± std and per-seed "kept", and (slow) that each seed is its own
run, end to end at a tiny size."""
from __future__ import annotations

import json

import pytest

from examples.staleness import band, kept, run_dir_for, table
from tests.test_examples_offline import TINY


def test_kept_pairs_each_seed_with_its_own_on_policy_run():
    scores = {("tis", 0): {0: 0.8, 1: 0.5, 2: 0.6}, ("tis", 16): {0: 0.4, 1: 0.5, 2: 0.6},
              ("reinforce", 0): {0: 0.8, 1: 1.0}}
    assert kept(scores, ("tis", 16), ("tis", 0)) == pytest.approx([0.5, 1.0, 1.0])
    assert kept(scores, ("tis", 16), ("reinforce", 0)) == pytest.approx([0.5, 0.5])  # seed 2 has no base: left out
    rows = table(scores, ["reinforce", "tis"], [0, 16]).splitlines()
    # mean 0.5, sample std 0.1; kept (0.5 + 1 + 1) / 3 = 83% with sample std 29%
    assert "| tis | 16 | 3 | 0.500 ± 0.100 | 83% ± 29% | 50% ± 0% |" in rows
    assert "| reinforce | 0 | 2 | 0.900 ± 0.141 | 100% ± 0% | 100% ± 0% |" in rows
    one = table({("tis", 0): {0: 0.8}}, ["tis"], [0, 16]).splitlines()
    assert one[2] == "| tis | 0 | 1 | 0.800 | 100% | - |" and len(one) == 3  # one seed: no ±; s = 16 not run


def test_band_is_the_seeds_pointwise_mean_and_range():
    mean, low, high = band([[0.0] * 4, [1.0] * 4, [0.5] * 5])  # cut to the shortest run
    assert mean == pytest.approx([0.5] * 4) and low == [0.0] * 4 and high == [1.0] * 4


def test_seed_zero_keeps_the_directory_name_runs_had_before_seeds(tmp_path):
    assert run_dir_for(tmp_path, "agro:0.1", 16, 0) == tmp_path / "agro-b0.1-s16"
    assert run_dir_for(tmp_path, "agro:0.1", 16, 2) == tmp_path / "agro-b0.1-s16-seed2"


@pytest.mark.slow
def test_each_seed_is_its_own_run(tmp_path, tiny_model_dir):
    from examples import staleness

    out = tmp_path / "out"
    assert staleness.main(["--s", "0", "--objectives", "tis", "--seeds", "0", "1", "--steps", "6", "--out", str(out),
                           "--model.path", tiny_model_dir, *TINY]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["tis|0"]) == {"0", "1"}
    runs = [out / "tis-s0", out / "tis-s0-seed1"]
    configs = [(r / "config.yaml").read_text() for r in runs]
    assert all(f"\n  seed: {k}\n" in c for k, c in zip((0, 1), configs))  # the seed reached the components
    # another seed is another run: other prompts drawn, other samples (the entropy of what was sampled differs even
    # where an untrained model's rewards are all 0)
    steps = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert [m["entropy_mean"] for m in steps[0]] != [m["entropy_mean"] for m in steps[1]]
    assert "| tis | 0 | 2 |" in (out / "staleness.md").read_text() and (out / "staleness.png").stat().st_size > 0
