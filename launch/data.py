"""Prompt sources: the built-in synthetic arithmetic task and JSONL prompt files.

A prompt file has one JSON object per line with `prompt` and `answer` (and
optionally `id`). Malformed lines are counted and skipped, never fatal.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from actors.generator import Prompt

SYNTHETIC_PREFIX = "synthetic:"


def arithmetic_examples(max_operand: int, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def arithmetic_corpus(max_operand: int) -> list[str]:
    """Every problem with its answer: the text the tokenizer is trained on."""
    return [f"{a}+{b}={a + b}" for a in range(max_operand + 1) for b in range(max_operand + 1)]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def load_prompts(source: str, max_operand: int = 9) -> PromptSet:
    """`synthetic:arithmetic` (every a+b with a, b <= max_operand) or a JSONL file path."""
    if source == SYNTHETIC_PREFIX + "arithmetic":
        corpus = [(f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        return PromptSet([Prompt(id=f"add-{p[:-1]}", text=p, answer=ans) for p, ans in corpus])
    if source.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"data source {source!r}: the only synthetic task is synthetic:arithmetic")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist")
    prompts, skipped = [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(Prompt(id=str(row.get("id", f"{path.stem}-{lineno}")), text=row["prompt"], answer=str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            reason = f"bad_row_{type(exc).__name__}"
            skipped[reason] = skipped.get(reason, 0) + 1
    if not prompts:
        raise ValueError(f"prompt file {source}: no usable rows ({skipped})")
    return PromptSet(prompts, skipped)


class PromptStream:
    """Endless shuffled epochs over a prompt set, with a position that a checkpoint can restore."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts, self.seed = prompts, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()
