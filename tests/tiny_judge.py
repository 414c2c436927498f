"""A randomly initialised judge built in a second, for the judge tests until locally trained judges exist: a
Qwen2ForSequenceClassification with one output and the tiny model's byte-level tokenizer with its chat template."""
from __future__ import annotations

from pathlib import Path

CORPUS = ["What is 2+3?", "5", "The answer is 5.", "Response A", "Response B", "hello world"]


def build_judge(out: Path, num_labels: int = 1, chat_template: bool = True, seed: int = 0,
                max_positions: int = 256) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from launch.model import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=64, alphabet="ascii")  # the alphabet alone: no merges
    if not chat_template:
        tokenizer.chat_template = None
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=max_positions,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():  # a random head's scores are ~1e-2 apart: scale it so rewards differ visibly
        model.score.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)
