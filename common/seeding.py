"""One call that seeds every random number generator a Relay process draws from."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Components that own a generator (the replay buffer's sampler, the prompt stream, vLLM's sampler) seed it
    from their config; this covers the global ones that library code and user rewards draw from unasked."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed must fit in 32 bits
    torch.manual_seed(seed)  # also seeds every CUDA device
