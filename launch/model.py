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
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2Tokenizer

from actors.prompts import Prompt, PromptFormat, render_all
from launch.config import ModelConfig
from launch.data import arithmetic_corpus, arithmetic_examples

PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"
EOS = IM_END  # as in Qwen's chat models: an assistant turn ends the reply
ROLES = ["system", "user", "assistant"]  # one token each, as in Qwen's vocabulary (they then match inside words too)
# Qwen2.5's template without its default system prompt: what real chat models render, in a few tokens
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
BUILD_VERSION = 4  # bump when the recipe changes, so cached builds are not reused


def _alphabet(kind: str) -> list[str]:
    """Byte-level symbols the tokenizer always has (a space is 'Ġ', a newline 'Ċ'): the newline the chat template
    writes (the task's own characters come from its corpus), or all of printable ASCII."""
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = string.printable if kind == "ascii" else "\n"
    return sorted({piece for ch in chars for piece, _ in bl.pre_tokenize_str(ch)})


def train_tokenizer(corpus: list[str], vocab_size: int, alphabet: str = "task") -> Qwen2Tokenizer:
    """A byte-level BPE trained on `corpus`, as a Qwen2Tokenizer, with a chat template.

    transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer whatever class it was saved as, rebuilding its
    pre-tokenizer (GPT-2 style regex: single digits, runs of symbols; then byte-level), so the tokenizer is trained
    under that same pipeline: the warm start, the launcher and vLLM then all tokenise alike. Characters outside
    its alphabet are dropped (Qwen2Tokenizer has no unknown token). `alphabet` "task": the corpus's characters
    and the template's newline, the smallest output layer (each unused row costs the tiny model accuracy:
    greedy a+b accuracy after the warm start 0.36 with the task's alphabet, 0.32 with printable ASCII, 0.13 with
    every byte); "ascii": printable ASCII too, so English prompts tokenise and decode back exactly."""
    qwen = Qwen2Tokenizer()._tokenizer  # the pipeline Qwen2Tokenizer builds: train the vocabulary under it
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=_alphabet(alphabet), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    # as (left, right) pairs: the BPE model Qwen2Tokenizer builds refuses "left right" strings (the arithmetic
    # corpus alone, split into single digits and symbols, has no merges, so only a richer corpus meets this)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    out = Qwen2Tokenizer(vocab=model["vocab"], merges=merges,
                         unk_token=None, eos_token=EOS, pad_token=PAD)
    out.add_tokens([AddedToken(IM_START, special=True), AddedToken(IM_END, special=True)])
    out.add_tokens(ROLES)
    out.chat_template = CHAT_TEMPLATE
    return out


def tiny_qwen2(tokenizer: Qwen2Tokenizer, cfg: ModelConfig) -> torch.nn.Module:
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


def warm_start(model: torch.nn.Module, tokenizer: Qwen2Tokenizer, cfg: ModelConfig, max_operand: int,
               fmt: PromptFormat = PromptFormat(apply_chat_template=False)) -> float:
    """Supervised steps on `prompt + answer<eos>`; the answer is right with prob `warm_start_correct_fraction`.

    The prompt is rendered by the function the run renders with (actors/prompts.py, in the run's format `fmt`),
    so RL starts on the rendering it was warm-started on. With a fraction below 1 the
    model learns the format and a noisy prior over answers, leaving the arithmetic itself for RL to learn.
    Returns the last loss.
    """
    rng = random.Random(cfg.seed)
    examples = arithmetic_examples(max_operand, n=cfg.warm_start_steps * 32, seed=cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # decayed to 0: at a constant rate the last steps' noise decides how good the start is (greedy a+b accuracy
    # 0.21 or 0.53 by seed at 200 steps); decayed, each seed ends near the same, better point
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(cfg.warm_start_steps, 1))
    model.train()
    loss = torch.tensor(0.0)
    for step in range(cfg.warm_start_steps):
        chunk = examples[step * 32 : (step + 1) * 32]
        prompt_ids = render_all(tokenizer, [Prompt(id="", text=p, answer="") for p, _ in chunk], fmt)
        answers = [a if rng.random() < cfg.warm_start_correct_fraction else str(rng.randint(0, 2 * max_operand))
                   for _, a in chunk]
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answer_ids)]
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)  # (B, L)
        labels = torch.full((len(seqs), width), -100)  # (B, L); the prompt is given, not learned
        for i, (seq, p) in enumerate(zip(seqs, prompt_ids)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
        mask = torch.arange(width)[None, :] < torch.tensor([len(q) for q in seqs])[:, None]  # (B, L)
        loss = model(input_ids=input_ids, attention_mask=mask.long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def default_model_dir(cfg: ModelConfig, max_operand: int, cache_dir: str | os.PathLike,
                      fmt: PromptFormat = PromptFormat(apply_chat_template=False)) -> Path:
    """Where build_default_model keeps (or will keep) the tiny model for `cfg`: its key is the whole recipe."""
    recipe = f"{cfg.model_dump_json(exclude={'path'})}/{max_operand}/{fmt}/{BUILD_VERSION}"
    return Path(cache_dir) / f"tiny-qwen2-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def build_default_model(cfg: ModelConfig, max_operand: int, cache_dir: str | os.PathLike,
                        fmt: PromptFormat = PromptFormat(apply_chat_template=False)) -> str:
    """Build (or reuse) the tiny model directory for `cfg`, warm-started on prompts rendered as `fmt` renders
    them (by default as the synthetic task renders: plain text; launch.train passes the run's own format);
    returns its path (HF format, safetensors)."""
    out = default_model_dir(cfg, max_operand, cache_dir, fmt)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    tokenizer = train_tokenizer(arithmetic_corpus(max_operand), cfg.vocab_size, cfg.tokenizer_alphabet)
    model = tiny_qwen2(tokenizer, cfg)
    loss = warm_start(model, tokenizer, cfg, max_operand, fmt) if cfg.warm_start_steps else float("nan")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "relay_build.json").write_text(json.dumps({"warm_start_loss": loss, **cfg.model_dump()}, indent=1))
    if out.exists():  # another process built it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return str(out)

