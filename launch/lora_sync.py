"""`learner.lora.sync` against the weight transport and the engines' update mode, at config time.

Adapter sync sends each version as the adapter alone, which generators serve through vLLM's LoRA support. That
needs a transport that carries any set of named tensors (`WeightTransport.carries_adapters`: object_store, disk;
shared-memory slots hold vLLM's own parameter layout and the push transports feed vLLM's weight-transfer engine,
which updates model parameters only) and engines that swap weights between requests (a request's adapter is fixed
for its life, so in_flight updates cannot move it mid-generation). `auto` becomes adapter where both hold, else
merged; an explicit `adapter` that cannot work is refused, naming the keys.
"""
from __future__ import annotations

from transport.registry import TRANSPORTS, transport_class

VLLM_MAX_LORA_RANK = 512  # the largest max_lora_rank vLLM accepts (actors/adapters.py VLLM_RANKS)


def resolve_lora_sync(cfg) -> str:
    """Set `cfg.learner.lora.sync` (a RunConfig's) to what runs; "" or the problem, naming the keys."""
    L, A, transport = cfg.learner, cfg.actors, cfg.weights.transport
    lora = L.lora
    if lora is None or lora.sync == "merged":
        return ""
    carriers = [name for name in TRANSPORTS if transport_class(name).carries_adapters]
    problems = []
    if transport not in carriers:
        problems.append(f"weights.transport {transport!r} carries full weights only (adapters travel by "
                        f"{' or '.join(carriers)})")
    if A.weight_update_mode != "between_batches":
        problems.append("actors.weight_update_mode in_flight cannot change a running request's adapter "
                        "(use between_batches)")
    if lora.rank > VLLM_MAX_LORA_RANK:
        problems.append(f"learner.lora.rank {lora.rank} exceeds vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANK}")
    if lora.sync == "adapter" and problems:
        return f"config key 'learner.lora.sync': adapter, but {'; '.join(problems)}; or set learner.lora.sync merged"
    sync = "merged" if problems else "adapter"
    cfg.learner = L.model_copy(update={"lora": lora.model_copy(update={"sync": sync})})
    return ""
