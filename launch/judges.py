"""Tiny learned judges for CPU runs: a reward model and a preference model trained here, in seconds, on a
preference whose answer is known -- arithmetic correctness.

No judge can be downloaded on the machines Relay is tested on, and a judge whose preference nobody can check
proves nothing about the RL run it drives, so the judges of the tiny default job are trained on the synthetic
task's own truth: the scalar judge scores a response to `a+b=` high when it is exactly the sum and low otherwise
(off by one or two, digits swapped, the operands run together, a random number, the right number with more
after it, empty or garbage); the preference judge gives P(a > b) near 1 when a is the sum and b is not, and
near 1/2 between two wrong responses (indifferent: which of two wrong sums is "closer" is not what the task
rewards). RL against either therefore raises the task's true accuracy, which a test can check.

Both are Qwen2ForSequenceClassification models with one output (num_labels 1), read through the one rendering
actors/judge_format.py defines (the judge's own chat template; pairs behind its markers), with a byte-level
BPE tokenizer over printable ASCII in the tiny policy's pipeline and chat template, so every character a policy
can write reaches the judge. Builds are cached under a hash of the recipe, like the tiny policy model.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config

from actors.judge_format import PAIR_A, PAIR_B, encode, pair_messages, scalar_messages, symmetric_preference
from launch.data import arithmetic_corpus
from launch.model import BUILD_VERSION, CHAT_TEMPLATE, IM_END, train_tokenizer

JudgeKind = Literal["scalar", "preference"]
KINDS = ("scalar", "preference")
JUDGE_VERSION = 1  # bump when the recipe changes, so cached judges are not reused
GARBAGE = "0123456789+= "
WRONG_WEIGHTS = (3, 1, 2, 3, 1, 1, 1, 1)  # by kind in wrong_answer


@dataclass(frozen=True)
class JudgeRecipe:
    """What a tiny judge is built from; every field is part of its cache key."""

    max_operand: int = 9  # the problems a+b=, a and b in 0..max_operand (the run's data.max_operand)
    hidden_size: int = 128  # head_dim 64 (as the tiny policy: vLLM's CPU attention rejects 16), so 2 heads
    num_layers: int = 2
    vocab_size: int = 160  # printable ASCII, the template's specials and roles, and a few merges
    steps: int = 300  # the scalar judge's optimizer steps of `batch_size` examples
    batch_size: int = 64
    lr: float = 3e-3  # the peak, after a linear warm-up over the first sixth of the steps, then linear decay to 0
    pair_steps: int = 200  # the preference judge's steps, from the scalar judge (see _trained)
    pair_lr: float = 1e-3  # the preference judge's peak rate
    aux_weight: float = 2.0  # weight of the next-token term that teaches the judge the sums (see train_judge)
    seed: int = 0

    @classmethod
    def for_task(cls, max_operand: int) -> "JudgeRecipe":
        """The recipe resolve_judge_path builds for operands up to `max_operand`: a larger table takes longer to
        learn (scalar AUC on fresh responses, max_operand 9: 0.75 after 300 steps, 0.91 after 750, 0.97 after
        1,200; max_operand 4: 0.997 after 300). The preference judge is reliable only up to 4 (0.98 of pairs);
        at 9 it prefers the right sum in 0.69 of pairs after 400 steps at 1e-3, 0.81 after 600 at 3e-3."""
        if max_operand <= 4:
            return cls(max_operand=max_operand)
        return cls(max_operand=max_operand, steps=1200, pair_steps=600, pair_lr=3e-3)


# ---- the known preference -------------------------------------------------------------------------------------

def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong response to a+b=: never exactly the sum (what actors.rewards.arithmetic_reward accepts)."""
    s = a + b
    # numbers of the right shape weigh most: a judge that only checks "one short number" scores 0.85 on a
    # uniform mix without computing a single sum
    kind = rng.choices(range(8), weights=WRONG_WEIGHTS)[0]
    if kind == 0:
        out = str(s + rng.choice([-2, -1, 1, 2]))
    elif kind == 1:
        out = str(s)[::-1] if s >= 10 else f"{s}{rng.randrange(10)}"  # digits swapped, or one digit too many
    elif kind == 2:
        out = rng.choice([f"{a}{b}", str(a), str(b), str(a * b), str(abs(a - b))])  # a confusion of the operands
    elif kind == 3:
        out = str(rng.randint(0, 2 * max(a, b, 1) + 1))
    elif kind == 4:
        out = rng.choice(["", " ", "="])
    elif kind == 5:
        out = "".join(rng.choice(GARBAGE) for _ in range(rng.randint(1, 8)))
    elif kind == 6:
        out = rng.choice([f"{s}{s}", f"{s}+", f"{s}={s}", f"{a}+{b}={s}", f"{s} {rng.randrange(10)}"])
    else:
        out = rng.choice([f"{rng.randrange(10)}{s}", f"{s}{rng.choice(GARBAGE)}", f"-{s}"])
    return out if "".join(out.split()) != str(s) else wrong_answer(a, b, rng)


def _chat(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}+{b}="}]  # Prompt.chat() of a synthetic:arithmetic prompt


@dataclass
class Examples:
    """Rendered training examples: token ids, the judge's target, and the auxiliary next-token labels."""

    ids: list[list[int]]  # each (L_i,): encode(tokenizer, scalar_messages | pair_messages)
    targets: list[float]  # scalar: 1 right, 0 wrong; preference: P(a > b) = 1, 0, or 1/2 between two wrong
    lm_labels: list[dict[int, int]]  # position -> the token the right answer has next there


def _lm_labels(tokenizer, text: str, ids: list[int], spans: list[tuple[int, str]], right: str) -> dict[int, int]:
    """Next-token labels that teach the judge the sum: at the token before each response (which starts at
    character `start` of the rendered `text`, for each (start, response) in `spans`) the right answer's first
    token, whatever the response is; through a response that is right, the rest of it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    right_ids = tokenizer(right, add_special_tokens=False)["input_ids"]
    labels: dict[int, int] = {}
    for start, response in spans:
        at = next((i for i, (lo, _) in enumerate(enc["offset_mapping"]) if lo >= start), None)
        if at is None or at == 0 or enc["offset_mapping"][at][0] != start or enc["input_ids"] != ids:
            continue  # the response does not start on a token boundary here: no label rather than a wrong one
        labels[at - 1] = right_ids[0]
        if response == right:
            labels.update({at - 1 + k: t for k, t in enumerate(right_ids) if k > 0})
    return labels


def _render(tokenizer, a: int, b: int, responses: tuple[str, ...]) -> tuple[list[int], dict[int, int]]:
    """Token ids of one response (scalar) or one pair (preference) to a+b=, and its next-token labels."""
    tail = len(IM_END) + 1  # the template ends a turn with <|im_end|> and a newline
    if len(responses) == 1:
        messages, spans = scalar_messages(_chat(a, b), responses[0]), [(-(len(responses[0]) + tail), responses[0])]
    else:
        x, y = responses
        messages = pair_messages(_chat(a, b), x, y)
        spans = [(-(len(y) + tail + len(PAIR_B) + len(x)), x), (-(len(y) + tail), y)]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = encode(tokenizer, messages)
    return ids, _lm_labels(tokenizer, text, ids, [(len(text) + at, r) for at, r in spans], str(a + b))


def examples(kind: JudgeKind, tokenizer, problems: list[tuple[int, int]], n: int, seed: int) -> Examples:
    """`n` rendered examples. scalar: half right answers (target 1), half wrong (0). preference: right vs wrong
    in either order (target 1 or 0), and wrong vs wrong (target 1/2) a third of the time."""
    rng = random.Random(seed)
    out, rendered = Examples([], [], []), {}  # the same few hundred texts recur: each is rendered once
    for i in range(n):
        a, b = rng.choice(problems)
        right, wrong = str(a + b), wrong_answer(a, b, rng)
        if kind == "scalar":
            responses, target = (right if i % 2 == 0 else wrong,), float(i % 2 == 0)
        elif i % 3 == 2:
            responses, target = (wrong, wrong_answer(a, b, rng)), 0.5
        else:
            first = rng.random() < 0.5
            responses, target = ((right, wrong) if first else (wrong, right)), float(first)
        key = (a, b, responses)
        if key not in rendered:
            rendered[key] = _render(tokenizer, a, b, responses)
        out.ids.append(rendered[key][0])
        out.targets.append(target)
        out.lm_labels.append(rendered[key][1])
    return out


# ---- the model ------------------------------------------------------------------------------------------------

def judge_tokenizer(recipe: JudgeRecipe):
    """The tiny policy's tokenizer pipeline and chat template over printable ASCII, merges learned on the task's
    text and the pair markers (so they are a few tokens each)."""
    corpus = arithmetic_corpus(recipe.max_operand) + [PAIR_A + PAIR_B] * 50
    return train_tokenizer(corpus, recipe.vocab_size, alphabet="ascii")


def new_judge(tokenizer, recipe: JudgeRecipe) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=2 * recipe.hidden_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.hidden_size // 64,
        num_key_value_heads=recipe.hidden_size // 64, head_dim=64, max_position_embeddings=256,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


def _batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id)  # (B, L), right-padded: the head reads the last non-pad
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
    return input_ids, (input_ids != pad_id).long()


@torch.no_grad()
def logits(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch: int = 256) -> list[float]:
    """The judge's one output per rendered sequence (as the reward-model service reads it)."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(ids), batch):
        input_ids, mask = _batch(ids[i : i + batch], pad_id)
        out += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].tolist()  # (B,)
    return out


def _loss(model: torch.nn.Module, data: Examples, lo: int, hi: int, pad_id: int, aux: float) -> torch.Tensor:
    """Binary cross-entropy of the judge's output against its target, plus `aux` x next-token cross-entropy of
    the right answer read off the same hidden states through the embedding matrix."""
    input_ids, mask = _batch(data.ids[lo:hi], pad_id)
    h = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, H)
    z = model.score(h[torch.arange(hi - lo), mask.sum(1) - 1])[:, 0]  # (B,): the head's last non-pad token
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(data.targets[lo:hi]))
    rows = [(i, pos, tok) for i, labels in enumerate(data.lm_labels[lo:hi]) for pos, tok in labels.items()]
    if aux and rows:
        b, pos, tok = (torch.tensor(col) for col in zip(*rows))  # each (N,)
        lm = h[b, pos] @ model.model.embed_tokens.weight.T  # (N, V)
        loss = loss + aux * torch.nn.functional.cross_entropy(lm, tok)
    return loss


def train_judge(model: torch.nn.Module, tokenizer, kind: JudgeKind, recipe: JudgeRecipe,
                problems: list[tuple[int, int]], steps: int, lr: float) -> float:
    """Train on `problems` for `steps` at a peak rate `lr`; returns the last loss.

    Two things make it learn in seconds (max_operand 4, hidden 128, 2 layers). The next-token term: trained on
    right/wrong alone, the judge settles on "one short number" (accuracy 0.85 on a uniform mix of wrong answers
    without computing a sum; AUC 0.79 after 2,000 steps at 1e-3 on mostly same-shape wrong numbers; 0.61 after
    600 steps with the warm-up below); taught also to predict the sum where the response starts, it compares
    the response with its own prediction (AUC 0.98 after 300 steps). And a warm-up: without one (1e-3 constant)
    it learns "the response equals the first operand" to 0.86 and stays there, at 3e-3 not at all; with 50
    steps of warm-up to 3e-3 it gets it right every time."""
    data = examples(kind, tokenizer, problems, steps * recipe.batch_size, recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (1 - i / steps))
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        lo = step * recipe.batch_size
        loss = _loss(model, data, lo, lo + recipe.batch_size, tokenizer.pad_token_id, recipe.aux_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def _trained(kind: JudgeKind, recipe: JudgeRecipe, cache_dir: str | os.PathLike,
             problems: list[tuple[int, int]]) -> tuple[torch.nn.Module, object, float]:
    """The trained judge, its tokenizer and its last loss. The preference judge starts from the scalar one
    (built or reused) with its output negated: reading a pair, the scalar judge scores the response it reads
    last, and z(a, b) must fall as b gets better; that start needs 200 steps to prefer the right sum in 0.99 of
    pairs where 500 steps from scratch reach 0.63 (max_operand 4)."""
    if kind == "scalar":
        tokenizer = judge_tokenizer(recipe)
        model = new_judge(tokenizer, recipe)
        return model, tokenizer, train_judge(model, tokenizer, kind, recipe, problems, recipe.steps, recipe.lr)
    scalar = build_tiny_judge("scalar", cache_dir, recipe)
    tokenizer = AutoTokenizer.from_pretrained(scalar)
    model = AutoModelForSequenceClassification.from_pretrained(scalar)
    with torch.no_grad():
        model.score.weight.neg_()
    return model, tokenizer, train_judge(model, tokenizer, kind, recipe, problems, recipe.pair_steps, recipe.pair_lr)


# ---- how good it is -------------------------------------------------------------------------------------------

def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def evaluate(model: torch.nn.Module, tokenizer, kind: JudgeKind, problems: list[tuple[int, int]],
             seed: int, per_problem: int = 4) -> dict[str, float]:
    """Accuracy on freshly drawn responses to `problems`. scalar: AUC of right vs wrong answers, and the
    accuracy of `output > 0` on a balanced set. preference: accuracy of the symmetrised P(right > wrong) > 1/2,
    and the mean |P - 1/2| between two wrong answers (0 = indifferent)."""
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    if kind == "scalar":
        right = logits(model, [encode(tokenizer, scalar_messages(_chat(a, b), str(a + b))) for a, b in problems], pad)
        wrong = logits(model, [encode(tokenizer, scalar_messages(_chat(a, b), wrong_answer(a, b, rng)))
                               for a, b in problems for _ in range(per_problem)], pad)
        acc = (sum(z > 0 for z in right) / len(right) + sum(z <= 0 for z in wrong) / len(wrong)) / 2
        return {"auc": auc(right, wrong), "accuracy": acc}
    wins, wrong_pairs = [], []
    for a, b in problems:
        for _ in range(per_problem):
            w, w2 = wrong_answer(a, b, rng), wrong_answer(a, b, rng)
            wins.append((str(a + b), w, _chat(a, b)))
            wrong_pairs.append((w, w2, _chat(a, b)))
    p_win, p_wrong = (preferences(model, tokenizer, rows) for rows in (wins, wrong_pairs))
    return {"accuracy": sum(p > 0.5 for p in p_win) / len(p_win),
            "wrong_pair_margin": sum(abs(p - 0.5) for p in p_wrong) / len(p_wrong)}


def preferences(model: torch.nn.Module, tokenizer, rows: list[tuple[str, str, list[dict]]]) -> list[float]:
    """P(a > b) for each (a, b, chat), symmetrised over both orders (actors/judge_format.py)."""
    ab = logits(model, [encode(tokenizer, pair_messages(c, a, b)) for a, b, c in rows], tokenizer.pad_token_id)
    ba = logits(model, [encode(tokenizer, pair_messages(c, b, a)) for a, b, c in rows], tokenizer.pad_token_id)
    return [symmetric_preference(x, y) for x, y in zip(ab, ba)]


# ---- building, caching, and the launcher's hook ---------------------------------------------------------------

def judge_dir(kind: JudgeKind, recipe: JudgeRecipe, cache_dir: str | os.PathLike) -> Path:
    """Where build_tiny_judge keeps (or will keep) the judge: its key is the whole recipe and its inputs (the
    rendering's markers, the chat template, the tokenizer pipeline's version)."""
    fields = {k: v for k, v in asdict(recipe).items() if kind == "preference" or not k.startswith("pair_")}
    key = json.dumps([kind, fields, PAIR_A, PAIR_B, CHAT_TEMPLATE, BUILD_VERSION, JUDGE_VERSION])
    return Path(cache_dir) / f"tiny-judge-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_tiny_judge(kind: JudgeKind, cache_dir: str | os.PathLike, recipe: JudgeRecipe = JudgeRecipe()) -> str:
    """Build (or reuse) a tiny `kind` judge (scalar or preference) trained on all of recipe.max_operand's
    problems; returns its directory (HF format: AutoModelForSequenceClassification and AutoTokenizer load it).
    Its relay_judge.json records the build time, the last loss and the accuracy on freshly drawn responses."""
    if kind not in KINDS:
        raise ValueError(f"judge kind {kind!r}: expected one of {KINDS}")
    out = judge_dir(kind, recipe, cache_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    start, cpu = time.perf_counter(), time.process_time()
    problems = [(a, b) for a in range(recipe.max_operand + 1) for b in range(recipe.max_operand + 1)]
    model, tokenizer, loss = _trained(kind, recipe, cache_dir, problems)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    metrics = evaluate(model, tokenizer, kind, problems, seed=recipe.seed + 2)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"kind": kind, "build_seconds": seconds, "build_cpu_seconds": cpu, "last_loss": loss, "eval": metrics,
              **asdict(recipe)}
    (tmp / "relay_judge.json").write_text(json.dumps(record, indent=1))
    if out.exists():  # another process built it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return str(out)


def resolve_judge_path(kind: JudgeKind, path: str | None, max_operand: int, cache_dir: str | os.PathLike) -> str:
    """A reward model's path: `path` as given, or (None) the tiny `kind` judge of the synthetic arithmetic task
    with operands up to `max_operand`, built (or reused) under `cache_dir` -- as model.path null builds the tiny
    policy."""
    if path is not None:
        return path
    return build_tiny_judge(kind, cache_dir, JudgeRecipe.for_task(max_operand))
