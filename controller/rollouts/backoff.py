"""How long the budget loop leaves a (model, class) alone after rollouts that fixed nothing.

A cool-down follows every rollout. When rollouts keep ending rolled back or failed, the
next one would most likely end the same way (the same source, the same observations),
so each one in a row doubles the cool-down, up to ``MAX_FACTOR`` times. A promotion, or
the class meeting its budget again (recorded on the last rollout as ``BUDGET_MET``),
ends the streak. An aborted rollout neither adds to the streak nor ends it: an operator
stopped it, which says nothing about whether recompressing helps; it is followed by the
cool-down the streak before it calls for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.rollouts.records import RolloutRecord, RolloutState

MAX_FACTOR = 32
# Rollouts read to count a streak: enough to reach MAX_FACTOR (2 ** (HISTORY - 1) >= it).
HISTORY = 8
# Detail key on the latest finished rollout: when its class was seen within budget again.
BUDGET_MET = "budget_met_unix_ms"


@dataclass(frozen=True)
class Backoff:
    """The cool-down that follows the latest rollouts of one (model, class)."""

    misses: int  # rollouts in a row (newest first) that ended rolled back or failed
    base_seconds: int

    @classmethod
    def of(cls, history: Sequence[RolloutRecord], base_seconds: int) -> Backoff:
        """``history``: the pair's rollouts, newest first (active and aborted ones are
        skipped)."""
        misses = 0
        for rollout in history:
            if rollout.state.active:
                continue
            if rollout.state is RolloutState.PROMOTED or BUDGET_MET in rollout.detail:
                break
            if rollout.state is not RolloutState.ABORTED:
                misses += 1
        return cls(misses, base_seconds)

    def after_one_more(self) -> Backoff:
        """The back-off once the rollout now ending (rolled back or failed) is counted."""
        return Backoff(self.misses + 1, self.base_seconds)

    @property
    def factor(self) -> int:
        return 1 if self.misses <= 1 else min(2 ** (self.misses - 1), MAX_FACTOR)

    @property
    def seconds(self) -> int:
        return self.base_seconds * self.factor

    def describe(self, model_name: str, device_class: str) -> str:
        """Why the loop waits, for the decision that ends a rollout ("" without a cool-down)."""
        if not self.base_seconds:
            return ""
        subject = f"{model_name} on {device_class} is judged again after {self.seconds} s"
        if self.factor == 1:
            return f"{subject} (the cool-down)"
        return (
            f"{subject}: {self.misses} rollouts in a row rolled back or failed, so the "
            f"{self.base_seconds} s cool-down is {self.factor}x (doubled each time, at most "
            f"{MAX_FACTOR}x; a promotion or the class meeting its budget resets it)"
        )
