"""Which adapter is merged into the base weights, and switching it: the policy decides, the manager does it.

Runs on the engine thread between steps, so a switch never happens inside a forward pass.
"""
from __future__ import annotations

import logging

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.merge import MergeManager
from loraplex.engine.merge_policy import MergeMode, MergePolicy

log = logging.getLogger(__name__)


class MergeControl:
    def __init__(self, manager: MergeManager, slots: AdapterSlots, pinned_keys: set[str], default_mode: MergeMode):
        self.manager, self.slots, self.pinned_keys = manager, slots, pinned_keys
        self.policy = MergePolicy(default_mode=default_mode)
        self.merged_key: str | None = None
        self.enabled = True  # False on a quantized base: nothing is ever merged
        self.num_switches = 0

    def set_mode(self, key: str, mode: MergeMode) -> None:
        """merged: merge now (one adapter at a time), unmerged: never, auto: when it dominates traffic.
        The caller makes sure a `merged` adapter is (being) loaded."""
        modes = self.policy.modes
        if mode == "merged":
            for other in [k for k, m in modes.items() if m == "merged"]:
                modes[other] = "unmerged"
        modes[key] = mode
        self.apply()

    def mode_of(self, key: str) -> str:
        return self.policy.mode_of(key)

    def forget_versions(self, prefix: str) -> None:
        """An adapter was deleted: unmerge it if merged (its running requests finish unmerged), drop its modes."""
        if self.merged_key is not None and self.merged_key.startswith(prefix):
            self.policy.modes[self.merged_key] = "unmerged"  # else it would stay merged (and pinned) for good
            self.apply()
        for key in [k for k in self.policy.modes if k.startswith(prefix)]:
            del self.policy.modes[key]

    def apply(self) -> None:
        """Switch to what the policy wants, once that adapter's slot is ready."""
        desired = self.policy.desired(self.merged_key) if self.enabled else None
        if desired == self.merged_key or (desired is not None and not self.slots.is_ready(desired)):
            return
        seconds = 0.0
        if self.merged_key is not None:
            self.manager.unmerge()
            seconds += self.manager.last_switch_s
            if self.slots.slot_of(self.merged_key) is not None:
                self.slots.pin(self.merged_key, self.merged_key in self.pinned_keys)
        if desired is not None:
            self.manager.merge(self.slots.slot_of(desired).index)
            seconds += self.manager.last_switch_s
            self.slots.pin(desired, True)  # a merged adapter's slot must not be reused
        log.info("merge switch", extra={"unmerged": self.merged_key, "merged": desired, "seconds": round(seconds, 4)})
        self.merged_key = desired
        self.num_switches += 1
        self.policy.switched()
