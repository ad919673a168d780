"""Exponential backoff with full jitter, for reconnecting to a controller that is away.

Full jitter (a uniform draw between 0 and the exponential ceiling) keeps a fleet of
agents from reconnecting in lockstep when the controller comes back.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial_s <= max_s or factor < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self) -> float:
        """The largest delay the next attempt may draw."""
        # cap the exponent so a long outage never overflows the float
        return min(self.max_s, self.initial_s * self.factor ** min(self.attempt, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
