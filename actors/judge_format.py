"""What a learned judge reads: the one rendering of a sample for reward models and of a pair for preference models.

A scalar reward model (a sequence-classification model with one output) scores the chat "prompt turns, then the
response as the assistant's turn", through the judge's own chat template -- the convention of the reward models
on the hub (Skywork-Reward, Athene-RM, ArmoRM), so they load and score unchanged.

A pairwise preference model scores the pair (a, b) rendered as one assistant turn holding both responses behind
fixed markers; its one output z gives P(a > b | x) = sigmoid(z). Position bias is removed by reading both
orders: P = (sigmoid(z(a, b)) + 1 - sigmoid(z(b, a))) / 2, so P(a > b) + P(b > a) = 1 exactly.

Within a group of n samples the preference model's reward of sample i is its mean win probability against the
other n - 1 (a Borda count over the group's pairs): dpo and ipo then take chosen = the most-preferred sample and
rejected = the least-preferred, the rule learner/objectives/preference.py applies to any reward.
"""
from __future__ import annotations

import math

PAIR_A = "[Response A]\n"
PAIR_B = "\n[Response B]\n"


def scalar_messages(chat: list[dict], response: str) -> list[dict]:
    """The conversation a reward model scores: the prompt's turns, then the response as the assistant's."""
    return [*chat, {"role": "assistant", "content": response}]


def pair_messages(chat: list[dict], a: str, b: str) -> list[dict]:
    """The conversation a preference model scores for P(a > b): both responses in one assistant turn, a first."""
    return [*chat, {"role": "assistant", "content": f"{PAIR_A}{a}{PAIR_B}{b}"}]


def encode(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids through the judge's own chat template (a judge without one is refused when it is loaded)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def symmetric_preference(z_ab: float, z_ba: float) -> float:
    """P(a > b) from the model's logits on both orders; P(a > b) + P(b > a) = 1."""
    return (sigmoid(z_ab) + 1.0 - sigmoid(z_ba)) / 2.0


def group_win_rates(p: list[list[float]]) -> list[float]:
    """Each sample's mean win probability against the rest of its group; p[i][j] = P(i > j) (diagonal unused)."""
    n = len(p)
    if n == 1:
        return [0.5]
    return [sum(p[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
