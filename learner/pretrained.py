"""The weights users (and a resumed run's generators) load: a Hugging Face directory, written then renamed.

Full fine-tuning: the model as safetensors. LoRA: the adapter in PEFT's format under `adapter/`
(`PeftModel.from_pretrained(base, "<dir>/adapter")`, vLLM's `LoRARequest`), plus the merged full weights at the top
when asked for. The tokenizer files are copied either way, so the directory names its tokenizer.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")


def write_pretrained(out_dir: str, module: torch.nn.Module, state: dict[str, torch.Tensor] | None,
                     adapter: dict[str, torch.Tensor] | None, model_path: str) -> str:
    """`out_dir` holding `state` (full weights under the base names; None: none) and `adapter` (the PEFT model
    `module`'s adapter tensors under its full names; None without LoRA), and the tokenizer of `model_path`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = module.get_base_model() if adapter is not None else module
    if state is not None:
        state = {k: v for k, v in state.items() if k != "lm_head.weight" or not base.config.tie_word_embeddings}
        base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if adapter is not None:  # adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained reads them
        module.save_pretrained(tmp / "adapter", state_dict=adapter, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(model_path) / name
        if src.exists():
            shutil.copy(src, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)
