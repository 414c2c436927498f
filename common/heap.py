"""Garbage collection in long-lived actor processes."""
from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Leave every object alive now out of all later garbage collections; they are still freed as soon as nothing
    refers to them. An actor calls this once, after its first unit of work, when what it keeps for its life exists
    (modules imported on first use, caches, the optimizer's state). vLLM does the same for its engine at start-up
    (vllm/utils/gc_utils.py freeze_gc_heap); without it, every full collection rescans that heap: measured in the
    default job, ~15 ms each in a rollout actor (45k objects built after vLLM's freeze, every ~25 requests) and
    0.24 s in the learner (465k objects)."""
    gc.collect()
    gc.freeze()
