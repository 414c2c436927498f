"""A random Qwen2 of a few thousand parameters with a word-level tokenizer, built in a second: for learner
tests that need DeepSpeed but not a trained model (the session's tiny_model_dir takes minutes to build)."""
from __future__ import annotations

from pathlib import Path


def build_micro_model(out: Path, vocab: int = 48, hidden: int = 32, layers: int = 2) -> str:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")),
                                        pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)
