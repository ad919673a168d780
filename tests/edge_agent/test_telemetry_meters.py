"""Energy meters on prepared sysfs trees: RAPL (with wrap-around), hwmon, the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.meters import (
    EstimateMeter,
    HwmonMeter,
    NoMeter,
    PowerModel,
    RaplMeter,
    choose_meter,
)

MAX_RANGE_UJ = 262_143_328_850


def rapl_zone(root: Path, name: str, energy_uj: int, max_uj: int = MAX_RANGE_UJ) -> Path:
    zone = root / "sys/class/powercap" / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def hwmon_sensor(root: Path, chip: str, name: str, microwatts: int) -> Path:
    path = root / "sys/class/hwmon" / chip / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{microwatts}\n")
    return path


def test_rapl_sums_packages_not_subzones_and_handles_wrap_around(tmp_path: Path) -> None:
    package0 = rapl_zone(tmp_path, "intel-rapl:0", MAX_RANGE_UJ - 2_000_000)
    package1 = rapl_zone(tmp_path, "intel-rapl:1", 10_000_000)
    core = rapl_zone(tmp_path, "intel-rapl:0:0", 5_000_000)  # inside package 0
    (tmp_path / "sys/class/powercap/intel-rapl").mkdir()  # the control type, no counter
    meter = choose_meter(tmp_path, PowerModel(2.0, 6.0))
    assert isinstance(meter, RaplMeter) and meter.source == "rapl"
    assert meter.read() == 0.0
    set_energy(package0, 3_000_000)  # wrapped: 2 J to the top, then 3 J
    set_energy(package1, 11_500_000)
    set_energy(core, 9_000_000)
    assert meter.read() == pytest.approx(5.0 + 1.5)
    set_energy(package0, 4_000_000)
    assert meter.read() == pytest.approx(7.5)
    assert meter.read() == pytest.approx(7.5)  # no change, no energy


def test_unreadable_rapl_falls_back_to_hwmon_which_integrates_power(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)  # no energy_uj: not readable, as for non-root users
    sensor = hwmon_sensor(tmp_path, "hwmon2", "power1_input", 4_000_000)
    hwmon_sensor(tmp_path, "hwmon2", "power1_average", 99_000_000)  # not an input
    hwmon_sensor(tmp_path, "hwmon3", "power2_input", 1_000_000)
    now = [100.0]
    meter = HwmonMeter.probe(tmp_path, clock=lambda: now[0])
    assert meter is not None and meter.source == "hwmon"
    now[0] = 102.0
    assert meter.read() == pytest.approx(5.0 * 2)  # 5 W for 2 s
    sensor.write_text("8000000\n")
    now[0] = 103.0
    assert meter.read() == pytest.approx(10.0 + (5.0 + 9.0) / 2)  # trapezoid over 1 s
    assert choose_meter(tmp_path, None).source == "hwmon"


def test_no_meter_uses_the_power_model_or_reports_none(tmp_path: Path) -> None:
    model = PowerModel(idle_watts=2.0, active_watts=10.0)
    assert isinstance(choose_meter(tmp_path, model), EstimateMeter)
    assert isinstance(choose_meter(tmp_path, None), NoMeter)
    wall, cpu = [0.0], [0.0]
    meter = EstimateMeter(model, cores=4, wall=lambda: wall[0], cpu=lambda: cpu[0])
    wall[0], cpu[0] = 3.0, 2.0  # 3 s, 2 CPU-seconds on 4 cores
    assert meter.read() == pytest.approx(2.0 * 3 + 8.0 * 2 / 4)
    with pytest.raises(ValueError, match="idle watts <= active watts"):
        PowerModel(idle_watts=5.0, active_watts=1.0)
