"""Energy meters: one is chosen at start, and every sample names it as its ``source``.

A meter is a cumulative joule counter for the whole device (``read()``); telemetry takes
the difference around each inference. Concurrent inferences each see the device's whole
energy over their interval, like the RAPL counter itself does.

- ``rapl``: ``<root>/sys/class/powercap/intel-rapl:N/energy_uj`` of every package zone
  (subzones ``intel-rapl:N:M`` are inside their package and not added again). The counter
  wraps at ``max_energy_range_uj``: a reading below the previous one means it wrapped.
  Readings must come more often than a wrap (hours at tens of watts); the window flush
  reads the meter too, so an idle agent still reads it every window.
- ``hwmon``: ``<root>/sys/class/hwmon/*/power*_input`` (µW), integrated over time with the
  trapezoid rule between readings.
- ``estimate``: no meter on the device; the class's power model, linear in utilisation:
  ``idle_w * wall + (active_w - idle_w) * cpu / cores`` from this process's CPU time.
- ``none``: no meter and no power model configured; joules stay 0.

The choice is one ordered table (``PROBES``) with an explicit default, not import-time
registration. Meter roots are configurable so tests read prepared directory trees.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from artifact.energy_sources import NO_METER

log = logging.getLogger(__name__)

MICRO = 1e-6
_RAPL_PACKAGE = re.compile(r"intel-rapl:\d+")
_HWMON_POWER = re.compile(r"power\d+_input")


class EnergyMeter(ABC):
    """A cumulative joule counter for the device; thread-safe."""

    source: str

    @abstractmethod
    def read(self) -> float:
        """Joules since the meter was created (never decreases)."""


@dataclass(frozen=True)
class PowerModel:
    """A device class's power draw: idle (nothing running) and active (all cores busy)."""

    idle_watts: float
    active_watts: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_watts <= self.active_watts:
            raise ValueError(
                "the power model needs 0 <= idle watts <= active watts, got "
                f"idle={self.idle_watts} active={self.active_watts}"
            )


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass
class _RaplZone:
    energy: Path
    max_range_uj: int
    last_uj: int
    total_uj: int = 0


class RaplMeter(EnergyMeter):
    source = "rapl"

    def __init__(self, zones: list[Path]) -> None:
        if not zones:
            raise ValueError("RaplMeter needs at least one zone directory")
        self._lock = threading.Lock()
        self._zones = [
            _RaplZone(
                energy=z / "energy_uj",
                max_range_uj=_read_int(z / "max_energy_range_uj"),
                last_uj=_read_int(z / "energy_uj"),
            )
            for z in zones
        ]

    @staticmethod
    def probe(root: Path) -> RaplMeter | None:
        base = root / "sys/class/powercap"
        zones = sorted(p for p in base.glob("intel-rapl*") if _RAPL_PACKAGE.fullmatch(p.name))
        try:
            return RaplMeter(zones) if zones else None
        except (OSError, ValueError) as exc:  # energy_uj is root-only on most kernels
            log.info("RAPL under %s is not readable (%s)", base, exc)
            return None

    def read(self) -> float:
        with self._lock:
            for zone in self._zones:
                now = _read_int(zone.energy)
                delta = now - zone.last_uj
                if delta < 0:  # wrapped at max_energy_range_uj
                    delta += zone.max_range_uj
                zone.total_uj += delta
                zone.last_uj = now
            return sum(z.total_uj for z in self._zones) * MICRO


class HwmonMeter(EnergyMeter):
    source = "hwmon"

    def __init__(self, sensors: list[Path], clock: Callable[[], float] = time.monotonic) -> None:
        if not sensors:
            raise ValueError("HwmonMeter needs at least one power*_input file")
        self._sensors = sensors
        self._clock = clock
        self._lock = threading.Lock()
        self._last_w = self._watts()
        self._last_t = clock()
        self._joules = 0.0

    @staticmethod
    def probe(root: Path, clock: Callable[[], float] = time.monotonic) -> HwmonMeter | None:
        base = root / "sys/class/hwmon"
        sensors = sorted(p for p in base.glob("*/power*_input") if _HWMON_POWER.fullmatch(p.name))
        try:
            return HwmonMeter(sensors, clock) if sensors else None
        except (OSError, ValueError) as exc:
            log.info("hwmon power sensors under %s are not readable (%s)", base, exc)
            return None

    def _watts(self) -> float:
        return sum(_read_int(s) for s in self._sensors) * MICRO

    def read(self) -> float:
        with self._lock:
            watts, now = self._watts(), self._clock()
            self._joules += (self._last_w + watts) / 2 * max(0.0, now - self._last_t)
            self._last_w, self._last_t = watts, now
            return self._joules


class EstimateMeter(EnergyMeter):
    source = "estimate"

    def __init__(
        self,
        model: PowerModel,
        *,
        cores: int | None = None,
        wall: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self._model = model
        self._cores = cores or os.cpu_count() or 1
        self._wall, self._cpu = wall, cpu
        self._wall0, self._cpu0 = wall(), cpu()

    def read(self) -> float:
        wall = self._wall() - self._wall0
        cpu = self._cpu() - self._cpu0
        dynamic = self._model.active_watts - self._model.idle_watts
        return self._model.idle_watts * wall + dynamic * cpu / self._cores


class NoMeter(EnergyMeter):
    source = NO_METER

    def read(self) -> float:
        return 0.0


Probe = Callable[[Path], EnergyMeter | None]
# Tried in order; the first meter found wins. The default comes after them (choose_meter).
PROBES: tuple[tuple[str, Probe], ...] = (
    ("rapl", RaplMeter.probe),
    ("hwmon", HwmonMeter.probe),
)


def choose_meter(sysfs_root: Path, power_model: PowerModel | None) -> EnergyMeter:
    """The best meter this device has: a hardware counter, else the power-model estimate."""
    for name, probe in PROBES:
        meter = probe(sysfs_root)
        if meter is not None:
            log.info("energy meter: %s (under %s)", name, sysfs_root)
            return meter
    if power_model is not None:
        log.info(
            "energy meter: estimate from CPU time (idle %.1f W, active %.1f W)",
            power_model.idle_watts,
            power_model.active_watts,
        )
        return EstimateMeter(power_model)
    log.warning(
        "no energy meter (no readable RAPL or hwmon power sensor under %s) and no power "
        "model (--idle-watts/--active-watts): energy is reported as 0 with source 'none'",
        sysfs_root,
    )
    return NoMeter()
