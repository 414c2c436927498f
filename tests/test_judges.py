"""The tiny judges (launch/judges.py): built in seconds, cached, loadable as the reward-model service loads a hub
judge, and right about arithmetic -- on fresh responses and on the tiny policy's own samples."""
from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.judge_format import encode, pair_messages, scalar_messages
from examples.tiny_judges import on_policy, policy_samples
from launch.judges import (JudgeRecipe, build_tiny_judge, evaluate, judge_dir, judge_tokenizer, logits,
                           new_judge, preferences, resolve_judge_path, wrong_answer)

PROBLEMS = [(a, b) for a in range(5) for b in range(5)]  # the fixture's max_operand 4
HELD_OUT_SEED = 12345  # responses drawn apart from the training draws (seed 1) and the build's own check (seed 2)


def _load(path: str):
    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["scalar", "preference"])
def test_a_judge_loads_as_a_one_output_sequence_classifier_with_a_chat_template(tiny_judges, kind):
    model, tok = _load(tiny_judges[kind])
    assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert tok.chat_template
    chat = [{"role": "user", "content": "3+4="}]
    ids = [encode(tok, scalar_messages(chat, "7")), encode(tok, pair_messages(chat, "7", "8 and more"))]
    assert len(logits(model, ids, tok.pad_token_id)) == 2
    text = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # every character reaches it


def test_the_build_is_cached_by_its_recipe(tiny_judges):
    cache = Path(tiny_judges["scalar"]).parent
    start = time.perf_counter()
    assert build_tiny_judge("scalar", cache, JudgeRecipe(max_operand=4)) == tiny_judges["scalar"]
    assert resolve_judge_path("preference", None, 4, cache) == tiny_judges["preference"]
    assert time.perf_counter() - start < 2.0  # reused, not retrained
    assert judge_dir("scalar", JudgeRecipe(max_operand=4, seed=1), cache) != Path(tiny_judges["scalar"])
    assert judge_dir("scalar", JudgeRecipe(max_operand=4), cache) != judge_dir("preference", JudgeRecipe(max_operand=4), cache)
    assert resolve_judge_path("scalar", "/some/hub-judge", 4, cache) == "/some/hub-judge"
    with pytest.raises(ValueError, match="judge kind 'pairwise'"):
        build_tiny_judge("pairwise", cache)


def test_the_scalar_judge_scores_right_sums_above_wrong_ones(tiny_judges):
    model, tok = _load(tiny_judges["scalar"])
    trained = evaluate(model, tok, "scalar", PROBLEMS, seed=HELD_OUT_SEED, per_problem=8)
    untrained = evaluate(new_judge(tok, JudgeRecipe(max_operand=4)), tok, "scalar", PROBLEMS, seed=HELD_OUT_SEED)
    assert trained["auc"] >= 0.97 and trained["accuracy"] >= 0.9, trained
    assert untrained["accuracy"] <= 0.6, untrained  # the measure is not met by any model


def test_the_preference_judge_prefers_the_right_sum_and_is_symmetric(tiny_judges):
    model, tok = _load(tiny_judges["preference"])
    trained = evaluate(model, tok, "preference", PROBLEMS, seed=HELD_OUT_SEED, per_problem=8)
    untrained = evaluate(new_judge(tok, JudgeRecipe(max_operand=4)), tok, "preference", PROBLEMS, seed=HELD_OUT_SEED)
    assert trained["accuracy"] >= 0.9, trained
    assert untrained["accuracy"] <= 0.75, untrained
    rng = random.Random(0)
    rows = [(str(a + b), wrong_answer(a, b, rng), [{"role": "user", "content": f"{a}+{b}="}]) for a, b in PROBLEMS]
    forward = preferences(model, tok, rows)
    backward = preferences(model, tok, [(b, a, chat) for a, b, chat in rows])
    assert all(abs(p + q - 1) < 1e-6 for p, q in zip(forward, backward))


def test_the_tokenizer_and_the_build_are_reproducible():
    recipe = JudgeRecipe(max_operand=4)
    assert judge_tokenizer(recipe).get_vocab() == judge_tokenizer(recipe).get_vocab()


def test_the_judges_rank_the_policys_own_samples_by_correctness(tiny_model_dir, tiny_judges):
    """The judges were trained on made-up wrong answers; RL shows them the policy's. On those too a right sample
    must outscore a wrong one, or RL against a judge would not raise the task's accuracy."""
    found = on_policy(tiny_judges, policy_samples(tiny_model_dir, PROBLEMS, per_prompt=8, seed=0))
    assert found["right"] >= 10 and found["wrong"] >= 10, found
    assert found["scalar_auc"] >= 0.9 and found["preference_accuracy"] >= 0.9, found
