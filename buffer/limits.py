"""The two gates of the buffer: staleness admission (generator side) and the rate limiter (both sides).

Both are plain counters without locks; ReplayBuffer calls them under its own condition.
"""
from __future__ import annotations

import collections
import time


class Admission:
    """AReaL's StalenessManager formula, counted in groups.

    A generator may start n more groups only if
        admitted + n <= (learner_version + max_staleness + 1) * groups_per_step,
    so no group can be more than max_staleness versions old when the learner reaches it
    (in arrival order). With max_staleness = 0 exactly one step's worth is in flight: sync RL.
    """

    def __init__(self, max_staleness: int, groups_per_step: int, enabled: bool) -> None:
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.enabled = enabled
        self.admitted = 0  # groups admitted over the run, minus those given back
        self.released = 0  # groups given back (never arrived, or dropped before being served)

    def capacity(self, learner_version: int) -> int:
        """Groups that may still start at this learner version."""
        if not self.enabled:
            return 1 << 62
        return (learner_version + self.max_staleness + 1) * self.groups_per_step - self.admitted

    def reserve(self, n_groups: int, learner_version: int, ahead: int = 0) -> int | None:
        """The first learner version, from `learner_version` to `ahead` versions later, at which n_groups more
        groups may start (counted as admitted), or None. Groups reserved at a later version must not start before
        the learner reaches it: then the bound holds for them as for any other."""
        if n_groups < 0 or ahead < 0:
            raise ValueError(f"n_groups and ahead must be >= 0, got {n_groups} and {ahead}")
        for version in range(learner_version, learner_version + ahead + 1):
            if n_groups <= self.capacity(version):
                self.admitted += n_groups
                return version
        return None

    def release(self, n_groups: int) -> None:
        # Clamped: offline data and groups put without admission must not drive the count negative.
        n = min(n_groups, self.admitted)
        self.admitted -= n
        self.released += n


class RateLimiter:
    """Reverb's SampleToInsertRatio, in groups.

    diff = inserts * spi - samples must stay within [offset - tolerance, offset + tolerance],
    offset = spi * min_size. Inserts are free until min_size groups went in; an insert is allowed
    if one more keeps diff <= max_diff; a sample of n if diff - n >= min_diff.
    """

    def __init__(self, samples_per_insert: float | None, tolerance: float, min_size: int) -> None:
        self.spi = samples_per_insert
        self.min_size = min_size
        offset = (samples_per_insert or 0.0) * min_size
        self.min_diff = offset - tolerance
        self.max_diff = offset + tolerance
        self.inserts = 0
        self.samples = 0

    def can_insert(self) -> bool:
        if self.spi is None or self.inserts < self.min_size:
            return True
        return (self.inserts + 1) * self.spi - self.samples <= self.max_diff

    def can_sample(self, n_groups: int) -> bool:
        if self.spi is None:
            return True
        return self.inserts * self.spi - (self.samples + n_groups) >= self.min_diff


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._t0 = time.monotonic()

    def add(self, n: int) -> None:
        self._events.append((time.monotonic(), n))
        self._trim()

    def rate(self) -> float:
        self._trim()
        now = time.monotonic()
        span = min(self.window_s, now - self._t0)
        return sum(n for _, n in self._events) / span if span > 0 else 0.0

    def _trim(self) -> None:
        horizon = time.monotonic() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
