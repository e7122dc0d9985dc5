"""When to merge an adapter (bookkeeping only): explicit per-adapter modes plus an `auto` policy.

auto: over a sliding window of recent steps, the adapter (among those in `auto` mode) that produced
at least `merge_share` of the tokens gets merged; the merged one is unmerged when its share falls
below `unmerge_share`. The gap between the two thresholds and a minimum dwell time between switches
keep the policy from flapping.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Literal

MergeMode = Literal["merged", "unmerged", "auto"]


class MergePolicy:
    def __init__(self, window_steps: int = 64, merge_share: float = 0.75, unmerge_share: float = 0.5,
                 min_dwell_steps: int = 64, default_mode: MergeMode = "unmerged"):
        assert 0 < unmerge_share < merge_share <= 1
        self.window_steps, self.merge_share, self.unmerge_share = window_steps, merge_share, unmerge_share
        self.min_dwell_steps = min_dwell_steps
        self.modes: dict[str, MergeMode] = {}  # adapter key -> mode set by an admin
        self.default_mode = default_mode  # for adapters with no explicit mode ("merged" not allowed)
        assert default_mode in ("unmerged", "auto")
        self._window: deque[Counter] = deque()
        self._totals: Counter = Counter()
        self._num_total = 0
        self._steps_since_switch = min_dwell_steps

    def observe(self, tokens_by_key: Counter) -> None:
        """Tokens computed in one step, by adapter key (None = base)."""
        self._window.append(tokens_by_key)
        self._totals.update(tokens_by_key)
        self._num_total += sum(tokens_by_key.values())
        if len(self._window) > self.window_steps:
            old = self._window.popleft()
            self._totals.subtract(old)
            self._num_total -= sum(old.values())
            for key in old:  # keys that left the window: else every adapter ever served stays here for good
                if self._totals[key] <= 0:
                    del self._totals[key]
        self._steps_since_switch += 1

    def desired(self, current: str | None) -> str | None:
        """The key that should be merged now (may equal `current`)."""
        explicit = [k for k, m in self.modes.items() if m == "merged"]
        if explicit:
            return explicit[-1]
        if current is not None and self.mode_of(current) != "auto":
            return None  # its mode changed to unmerged
        if self._steps_since_switch < self.min_dwell_steps or not self._num_total:
            return current
        if current is not None and self._share(current) >= self.unmerge_share:
            return current
        best = max((k for k in self._totals if k is not None and self.mode_of(k) == "auto"), key=self._share, default=None)
        return best if best is not None and self._share(best) >= self.merge_share else None

    def mode_of(self, key: str) -> MergeMode:
        return self.modes.get(key, self.default_mode)

    def switched(self) -> None:
        self._steps_since_switch = 0

    def _share(self, key: str) -> float:
        return self._totals.get(key, 0) / self._num_total if self._num_total else 0.0
