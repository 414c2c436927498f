"""The replay buffer and the one Rollout record that actors, buffer and learner share."""
from buffer.schema import ROLLOUT_SCHEMA, Rollout, rollouts_from_arrow, rollouts_to_arrow

__all__ = ["ROLLOUT_SCHEMA", "Rollout", "rollouts_from_arrow", "rollouts_to_arrow"]
