"""Concurrent inferences split a device-wide energy meter instead of each claiming all of it."""

from __future__ import annotations

from collections.abc import Iterator

from edge_agent.telemetry import EnergyShares


def meter(*readings: float) -> EnergyShares:
    """Shares over a meter that reads ``readings`` in turn (one per start or stop)."""
    values: Iterator[float] = iter(readings)
    return EnergyShares(lambda: next(values))


def test_overlapping_inferences_share_the_meter_and_add_up_to_it() -> None:
    # A starts at 0 J, B at 10 J, A ends at 30 J, B ends at 40 J
    shares = meter(0.0, 10.0, 30.0, 40.0)
    a = shares.start()
    b = shares.start()
    a_joules = shares.stop(a)  # 10 alone, then half of 20 with B
    b_joules = shares.stop(b)  # half of 20 with A, then 10 alone
    assert (a_joules, b_joules) == (20.0, 20.0)
    assert a_joules + b_joules == 40.0  # each charged alone they would claim 30 + 30


def test_one_inference_gets_the_whole_increase_and_idle_energy_goes_to_none() -> None:
    shares = meter(5.0, 7.5, 100.0, 101.0)
    first = shares.start()
    assert shares.stop(first) == 2.5
    second = shares.start()  # 92.5 J passed while nothing ran: nobody is charged for it
    assert shares.stop(second) == 1.0


def test_a_meter_that_goes_backwards_charges_nothing() -> None:
    # a meter that restarted (or a wrap the meter could not tell): never negative energy
    shares = meter(50.0, 10.0)
    token = shares.start()
    assert shares.stop(token) == 0.0
