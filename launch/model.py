"""Build the default job's model: a tiny Qwen2-shaped causal LM and a tokenizer trained here.

No model can be downloaded at run time on the machines Relay is tested on, so the
default job makes its own: a `tokenizers` BPE trained on the task's text, a
Qwen2 model from a config (head_dim 64: vLLM's CPU attention rejects 16), and an
optional short supervised warm start so RL starts from a policy that at least
speaks the answer format. Users point `model.path` at a local directory or a hub
name instead, and nothing here runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from launch.config import ModelConfig
from launch.data import arithmetic_corpus, arithmetic_examples

EOS, PAD = "<|eos|>", "<|pad|>"
BUILD_VERSION = 2  # bump when the recipe changes, so cached builds are not reused


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE whose digits and symbols stay single tokens, so an answer tokenises the same in every context."""
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, "<|unk|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token="<|unk|>")


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast, cfg: ModelConfig) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.hidden_size // 64,
        num_key_value_heads=cfg.hidden_size // 64,
        head_dim=64,
        max_position_embeddings=cfg.max_model_len,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def warm_start(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, cfg: ModelConfig, max_operand: int) -> float:
    """Supervised steps on `prompt + answer<eos>`; the answer is right with prob `warm_start_correct_fraction`.

    With a fraction below 1 the model learns the format and a noisy prior over
    answers, leaving the arithmetic itself for RL to learn. Returns the last loss.
    """
    rng = random.Random(cfg.seed)
    examples = arithmetic_examples(max_operand, n=cfg.warm_start_steps * 32, seed=cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(cfg.warm_start_steps):
        texts, prompt_lens = [], []
        for prompt, answer in examples[step * 32 : (step + 1) * 32]:
            if rng.random() >= cfg.warm_start_correct_fraction:
                answer = str(rng.randint(0, 2 * max_operand))
            texts.append(prompt + answer + EOS)
            prompt_lens.append(len(tokenizer(prompt)["input_ids"]))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()  # (B, L)
        labels[enc["attention_mask"] == 0] = -100
        for i, n in enumerate(prompt_lens):
            labels[i, :n] = -100  # the prompt is given, not learned
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def default_model_dir(cfg: ModelConfig, max_operand: int, cache_dir: str | os.PathLike) -> Path:
    """Where build_default_model keeps (or will keep) the tiny model for `cfg`: its key is the whole recipe."""
    key = hashlib.sha256((cfg.model_dump_json(exclude={"path"}) + f"/{max_operand}/{BUILD_VERSION}").encode()).hexdigest()[:12]
    return Path(cache_dir) / f"tiny-qwen2-{key}"


def build_default_model(cfg: ModelConfig, max_operand: int, cache_dir: str | os.PathLike) -> str:
    """Build (or reuse) the tiny model directory for `cfg`; returns its path (HF format, safetensors)."""
    out = default_model_dir(cfg, max_operand, cache_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    tokenizer = train_tokenizer(arithmetic_corpus(max_operand), vocab_size=cfg.vocab_size)
    model = tiny_qwen2(tokenizer, cfg)
    loss = warm_start(model, tokenizer, cfg, max_operand) if cfg.warm_start_steps else float("nan")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "relay_build.json").write_text(json.dumps({"warm_start_loss": loss, **cfg.model_dump()}, indent=1))
    if out.exists():  # another process built it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return str(out)
