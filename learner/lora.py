"""LoRA on the learner through PEFT: wrapping the policy, and what generators load of it.

Two ways a version reaches generators (`learner.lora.sync`). Adapter: only the adapter's tensors, under the names
and with the adapter_config.json PEFT saves (`peft_saved`, `peft_config`), which vLLM's LoRA support reads: KBs to
MBs per version instead of the whole model. Merged: full weights under the base model's names, which every transport
carries (shared-memory slots and vLLM's weight-transfer pushes know only the model's own parameters). The merge is
computed per targeted layer as PEFT's own `merge` does it (W + get_delta_weight, i.e. B A * alpha / rank) into new
tensors, so the live model stays unmerged and training goes on; the frozen base weights are handed out as they are.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from learner.config import LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER = "default"  # PEFT's name for the one adapter Relay trains
PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the base model's parameter names


def wrap(model: torch.nn.Module, cfg: LoraConfig) -> PeftModel:
    """`model` with adapters on `cfg.target_modules`; every other parameter frozen (requires_grad False)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg, adapter_name=ADAPTER)
    except ValueError as e:  # PEFT names the modules it did not find, not the config key
        raise ValueError(f"config key 'learner.lora.target_modules': {e}") from None


def base_name(name: str) -> str:
    """The base model's name of a PEFT-wrapped tensor (`...q_proj.base_layer.weight` -> `...q_proj.weight`)."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def merged_state(model: PeftModel, copy: bool) -> dict[str, torch.Tensor]:
    """Full weights (parameters only) with the adapter merged, under the base model's names, on CPU.

    Targeted weights are new tensors (W + delta); the others are views of the live (frozen) parameters unless
    `copy`. Call with every parameter available (inside GatheredParameters under ZeRO-3)."""
    from peft.tuners.lora import LoraLayer

    lora_layers = {f"{name}.base_layer.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if is_adapter(name):
                continue
            layer = lora_layers.get(name)
            if layer is not None and ADAPTER in layer.lora_A:
                merged = p.detach() + layer.get_delta_weight(ADAPTER).to(p.dtype)  # as PEFT's merge adds it
                state[base_name(name)] = merged.cpu()
            else:
                state[base_name(name)] = p.detach().to("cpu", copy=copy)
    return state


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's full names, copied to CPU (what `save_pretrained(state_dict=...)` reads)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if is_adapter(name)}


def sends_adapter(cfg: LoraConfig | None, transport: Any) -> bool:
    """Whether a version goes to generators as the adapter alone: `sync: adapter`, or `auto` (what a launched run
    resolves at config time; a learner used on its own) where the transport can carry one."""
    if cfg is None:
        return False
    return cfg.sync == "adapter" or (cfg.sync == "auto" and getattr(transport, "carries_adapters", False))


def peft_saved(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`adapter_state`'s tensors under the names PEFT saves (adapter_model.safetensors): the adapter's own name
    dropped (`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`), as vLLM and PeftModel read them."""
    return {name.replace(f".{ADAPTER}.", "."): t for name, t in tensors.items()}


def peft_config(model: PeftModel) -> dict:
    """The adapter's adapter_config.json as a JSON-able dict (sets as sorted lists, enums as their values), with
    target_modules as PEFT resolved them ("all-linear" becomes the module names)."""
    config = model.peft_config[ADAPTER].to_dict()
    config["inference_mode"] = True  # what save_pretrained writes: the generator only runs it
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
