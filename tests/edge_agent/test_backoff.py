"""Reconnect delays grow exponentially, stay under the cap, and are jittered."""

from __future__ import annotations

import random

from edge_agent.backoff import Backoff


def test_ceiling_doubles_from_initial_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_delays_are_full_jitter_within_the_ceiling_and_deterministic_with_a_seed() -> None:
    first = Backoff(0.5, 30.0, rng=random.Random(42))
    second = Backoff(0.5, 30.0, rng=random.Random(42))
    delays = []
    for _ in range(200):
        ceiling = first.ceiling()
        delay = first.next_delay()
        assert 0.0 <= delay <= ceiling <= 30.0
        assert second.next_delay() == delay
        delays.append(delay)
    capped = delays[10:]
    assert len(set(capped)) == len(capped)  # jittered, not a fixed 30 s
    assert max(capped) > 15.0  # and it does use the range up to the cap
    assert first.attempt == 200


def test_reset_starts_over_and_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(3))
    for _ in range(5000):
        backoff.next_delay()
    assert backoff.ceiling() == 30.0
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 0.5
    assert backoff.next_delay() <= 0.5
