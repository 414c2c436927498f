"""BufferConfig: every knob of the replay buffer, validated when the run starts."""
from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field


class BufferConfig(pydantic.BaseModel, extra="forbid"):
    """Replay buffer settings; units are groups (all generations of one prompt occurrence)."""

    capacity_groups: int = Field(1024, ge=1)
    """Most complete groups held; the oldest (by `eviction`) go first when full."""
    capacity_bytes: int | None = Field(None, ge=1)
    """Optional bound on the Arrow bytes of complete groups held (None = groups bound only)."""
    eviction: Literal["fifo", "oldest_version"] = "fifo"
    """Which group leaves when full: first inserted, or oldest behaviour policy version."""
    sampler: Literal["fifo", "uniform", "prioritized"] = "fifo"
    """How groups are chosen: arrival order, uniformly at random, or by priority."""
    priority: Literal["recency", "advantage"] = "recency"
    """Prioritized sampler's score: newer arrival, or mean |reward - group mean reward|."""
    priority_exponent: float = Field(1.0, ge=0.0)
    """alpha in p_i ~ (score_i + eps)^alpha; 0 makes prioritized sampling uniform."""
    priority_eps: float = Field(1e-3, gt=0.0)
    """Keeps zero-score groups (all rewards equal) sampleable."""
    max_staleness: int = Field(1, ge=0)
    """Bound on learner_version - behaviour policy_version; 0 makes the run synchronous."""
    staleness_policy: Literal["admission", "drop"] = "admission"
    """admission: generators wait before sampling too far ahead; drop: admit all, discard stale groups."""
    max_reuse: int = Field(1, ge=1)
    """Times one group may be served to the learner before it leaves the buffer."""
    min_size_groups: int = Field(1, ge=1)
    """Complete groups that must be held before the first sample is served."""
    samples_per_insert: float | None = Field(None, gt=0.0)
    """Reverb-style limiter: groups served per group inserted (None = off)."""
    spi_tolerance: float = Field(64.0, ge=0.0)
    """How far (in groups served) the limiter lets samples run ahead of or behind the ratio."""
    rate_window_s: float = Field(30.0, gt=0.0)
    """Window over which inserts_per_s and samples_per_s are measured."""
    filter: Literal["none", "zero_variance"] = "none"
    """Dynamic sampling (DAPO): zero_variance drops, at put time, every online group whose rewards are all equal
    (a group-relative advantage is 0 for each of its members: nothing to learn). Counted as filtered_<reason>,
    its admission slot is given back, so the launcher dispatches another prompt and learner batches stay full."""
    rollout_log: bool = True
    """Append every group the buffer stores to run_dir/rollouts/ (Arrow IPC), so `python -m launch.export` can
    write the whole run, not only what a checkpoint still holds. Costs about the run's rollout bytes on disk."""
    seed: int = 0
    """Seeds the uniform and prioritized samplers (defaults to the run's seed)."""

    @pydantic.model_validator(mode="after")
    def _spi_within_reuse(self) -> "BufferConfig":
        # Each group can be served max_reuse times, so a higher ratio would starve the sampler forever.
        if self.samples_per_insert is not None and self.samples_per_insert > self.max_reuse:
            raise ValueError(
                f"buffer.samples_per_insert={self.samples_per_insert} > buffer.max_reuse={self.max_reuse}:"
                " the limiter would wait for samples no group can give"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _min_size_within_capacity(self) -> "BufferConfig":
        if self.min_size_groups > self.capacity_groups:
            raise ValueError(
                f"buffer.min_size_groups={self.min_size_groups} > buffer.capacity_groups={self.capacity_groups}:"
                " sampling could never start"
            )
        return self
