"""How a run against a tiny judge did, judged by the truth: the true accuracy of its rollouts (the rollout log's
response_text scored with the `arithmetic` rule) by policy version, and the win rate of a trained policy against
the starting one under a preference judge. The arithmetic task's prompts carry their problem in their id
(`add-<a>+<b>`, launch/data.py), so no tokenizer is needed to know what each rollout answered."""
from __future__ import annotations

import json
from pathlib import Path


def _problem(prompt_id: str) -> tuple[int, int]:
    a, b = prompt_id.rsplit("-", 1)[-1].split("+")
    return int(a), int(b)


def accuracy_by_version(run_dir: str | Path, source: str | None = None) -> dict[int, list[float]]:
    """{policy version: the arithmetic rule's score of each stored rollout sampled under it}, of one data_source
    (None: all)."""
    from actors.rewards import arithmetic_reward
    from buffer.rollout_log import read_log

    log = read_log(str(Path(run_dir) / "rollouts")).to_pydict()
    out: dict[int, list[float]] = {}
    for pid, text, version, src in zip(log["prompt_id"], log["response_text"], log["policy_version"],
                                       log["data_source"]):
        if source is None or src == source:
            a, b = _problem(pid)
            out.setdefault(version, []).append(arithmetic_reward(text, str(a + b)))
    return out


def first_last(values: list[float], part: int = 5) -> tuple[float, float]:
    """Means of the first and the last `part`-th of `values` (at least one value each)."""
    k = max(len(values) // part, 1)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def true_accuracy(run_dir: str | Path, source: str | None = None, part: int = 5) -> tuple[float, float]:
    """True accuracy of the rollouts of the first and the last `part`-th of the policy versions sampled."""
    by_version = accuracy_by_version(run_dir, source)
    versions = sorted(by_version)
    k = max(len(versions) // part, 1)
    first = [x for v in versions[:k] for x in by_version[v]]
    last = [x for v in versions[-k:] for x in by_version[v]]
    return sum(first) / len(first), sum(last) / len(last)


def train_rewards(run_dir: str | Path, key: str = "reward_mean") -> list[float]:
    """`key` of every learner step in the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def win_rate(judge_dir: str, policy_dir: str, start_dir: str, max_operand: int, per_prompt: int = 8,
             seed: int = 0) -> float:
    """Mean P(policy's sample > starting policy's sample) under the preference judge at `judge_dir`, over
    `per_prompt` temperature-1 samples of each on every a+b= problem (paired by prompt and draw)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from examples.tiny_judges import policy_samples
    from launch.judges import preferences

    problems = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    new, old = (policy_samples(d, problems, per_prompt, seed) for d in (policy_dir, start_dir))
    rows = [(x, y, [{"role": "user", "content": f"{a}+{b}="}]) for (a, b, x), (_, _, y) in zip(new, old)]
    model = AutoModelForSequenceClassification.from_pretrained(judge_dir)
    p = preferences(model, AutoTokenizer.from_pretrained(judge_dir), rows)
    return sum(p) / len(p)


def sampled_accuracy(policy_dir: str, max_operand: int, per_prompt: int = 8, seed: int = 0) -> float:
    """True accuracy of `per_prompt` temperature-1 samples of the policy at `policy_dir` on every a+b= problem:
    what a policy has learned also where its rollouts cannot show it (s = infinity samples the starting policy)."""
    from actors.rewards import arithmetic_reward
    from examples.tiny_judges import policy_samples

    problems = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    samples = policy_samples(policy_dir, problems, per_prompt, seed)
    return sum(arithmetic_reward(text, str(a + b)) for a, b, text in samples) / len(samples)
