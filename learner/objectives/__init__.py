"""Off-policy objective library: pure (config, per-token tensors) -> (loss, metrics) functions.

Pick one by name with ObjectiveConfig(name=...) and call compute_loss; the learner asks
needs_reference / needs_proximal to know which extra log-probs to compute.
"""

from learner.objectives.config import ObjectiveConfig
from learner.objectives.inputs import LossInputs, StepContext
from learner.objectives.registry import (REGISTRY, compute_loss, needs_proximal, needs_reference, needs_whole_groups,
                                         step_context)

__all__ = ["LossInputs", "ObjectiveConfig", "StepContext", "compute_loss", "REGISTRY", "needs_reference",
           "needs_proximal", "needs_whole_groups", "step_context"]
