"""The replay buffer and the one Rollout record that actors, buffer and learner share.

Importing buffer does not import Ray; the Ray shell is buffer.actor.
"""
from buffer.config import BufferConfig
from buffer.persist import BufferCorruptError
from buffer.replay import ReplayBuffer
from buffer.schema import (ROLLOUT_SCHEMA, Rollout, missing_behaviour_logprobs, rollout_batch, rollouts_from_arrow,
                           rollouts_to_arrow)

__all__ = [
    "ROLLOUT_SCHEMA",
    "BufferConfig",
    "BufferCorruptError",
    "ReplayBuffer",
    "Rollout",
    "missing_behaviour_logprobs",
    "rollout_batch",
    "rollouts_from_arrow",
    "rollouts_to_arrow",
]
