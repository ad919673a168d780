"""Device-class files: the shipped examples load, malformed ones are refused by field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from controller.device_classes import DeviceClassError, load_device_class

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "device-classes").glob("*.yaml"))


def test_the_three_shipped_classes_load() -> None:
    classes = {load_device_class(p).name: load_device_class(p) for p in EXAMPLES}
    assert set(classes) == {"home-hub", "smart-speaker", "camera"}
    camera = classes["camera"]
    assert camera.cores == 1 and camera.budgets.max_artifact_bytes is not None
    # energy between idle and active draw
    one_second_all_busy = camera.power.joules(1.0, busy_cores=1, cores=1)
    assert one_second_all_busy == pytest.approx(camera.power.active_watts)
    assert camera.power.joules(1.0, busy_cores=0, cores=1) == pytest.approx(camera.power.idle_watts)


def test_flags_tighten_budgets_for_one_run() -> None:
    hub = load_device_class(ROOT / "deploy" / "device-classes" / "home-hub.yaml")
    tight = hub.with_budgets(p95_latency_ms=1.5, max_artifact_bytes=None)
    assert tight.budgets.p95_latency_ms == 1.5
    assert tight.budgets.max_artifact_bytes == hub.budgets.max_artifact_bytes
    assert hub.budgets.p95_latency_ms == 20  # the original is untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed", "not valid YAML: line 1, column 16: expected ','"),
        ("- a list", "must hold a mapping"),
        ("name: Hub\n", "name"),
        (
            "name: hub\narch: sparc\ncores: 0\nrelative_speed: 1\nmemory_bytes: 1\n"
            "model_storage_bytes: 1\npower: {idle_watts: 1, active_watts: 2}\nbudgets: {}\n",
            "arch",
        ),
        (
            "name: hub\narch: x86_64\ncores: 2\nrelative_speed: 1\nmemory_bytes: 1\n"
            "model_storage_bytes: 10\npower: {idle_watts: 3, active_watts: 2}\n"
            "budgets: {max_artifact_bytes: 100}\n",
            "active_watts",
        ),
        (
            "name: hub\narch: x86_64\ncores: 2\nrelative_speed: 1\nmemory_bytes: 1\n"
            "model_storage_bytes: 10\npower: {idle_watts: 1, active_watts: 2}\n"
            "budgets: {max_artifact_bytes: 100, bogus: 1}\n",
            "bogus",
        ),
    ],
)
def test_malformed_files_are_refused_naming_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "class.yaml"
    path.write_text(text)
    with pytest.raises(DeviceClassError, match=expected):
        load_device_class(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeviceClassError, match="cannot read"):
        load_device_class(tmp_path / "absent.yaml")


# ------------------------------------------------- values an operator surely did not mean

HARDWARE = (
    "name: probe\narch: x86_64\ncores: 2\nrelative_speed: 1.0\nmemory_bytes: 1000000000\n"
    "model_storage_bytes: 100000000\npower:\n  idle_watts: 1\n  active_watts: 5\n"
)


def write_class(tmp_path: Path, budgets: str, hardware: str = HARDWARE) -> Path:
    """A device-class file: ``hardware`` lines, then ``budgets:`` with the given lines."""
    path = tmp_path / "class.yaml"
    lines = "".join(f"  {line}\n" for line in budgets.splitlines())
    path.write_text(hardware + ("budgets:\n" + lines if lines else "budgets: {}\n"))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(DeviceClassError) as caught:
        load_device_class(path)
    message = str(caught.value)
    assert "\n" not in message  # one line; problems are joined with '; '
    return message.removeprefix(f"{path} ")


def test_every_shipped_class_loads_from_deploy_and_demo() -> None:
    files = EXAMPLES + sorted((ROOT / "demo" / "device-classes").glob("*.yaml"))
    assert len(files) == 6
    for path in files:
        device_class = load_device_class(path)
        drop = device_class.budgets.max_accuracy_drop
        assert drop is None or drop <= 0.5, path


@pytest.mark.parametrize(
    ("budgets", "expected"),
    [
        (
            "p95_latency_ms: true",
            "budgets.p95_latency_ms: expected a number in milliseconds (the unit is in the "
            "key's name), got true (YAML reads true/false, yes/no and on/off as booleans)",
        ),
        (
            "max_artifact_bytes: yes",
            "budgets.max_artifact_bytes: expected a whole number of bytes (the unit is in the "
            "key's name), got true (YAML reads",
        ),
        (
            "min_fidelity: on",
            "budgets.min_fidelity: expected a fraction in (0, 1] (0.98 = 98 %), got true",
        ),
        (
            "max_accuracy_drop: false",
            "budgets.max_accuracy_drop: expected a fraction (0.01 = one point of accuracy), "
            "got false",
        ),
    ],
)
def test_a_boolean_is_never_a_number(tmp_path: Path, budgets: str, expected: str) -> None:
    assert expected in refusal(write_class(tmp_path, budgets))


def test_a_boolean_is_refused_in_the_hardware_and_power_fields_too(tmp_path: Path) -> None:
    hardware = HARDWARE.replace("cores: 2", "cores: true").replace(
        "idle_watts: 1", "idle_watts: off"
    )
    message = refusal(write_class(tmp_path, "", hardware))
    assert message == (
        "is not a valid device class: cores: expected a whole number of CPU cores, got true "
        "(YAML reads true/false, yes/no and on/off as booleans); power.idle_watts: expected a "
        "number in watts (the unit is in the key's name), got false (YAML reads true/false, "
        "yes/no and on/off as booleans)"
    )


def test_ints_still_pass_for_number_fields(tmp_path: Path) -> None:
    budgets = load_device_class(
        write_class(tmp_path, "p95_latency_ms: 20\nmax_accuracy_drop: 0")
    ).budgets
    assert budgets.p95_latency_ms == 20.0 and isinstance(budgets.p95_latency_ms, float)
    assert budgets.max_accuracy_drop == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HARDWARE + "budgets:\n  max_artifact_bytes: 5000000\n  max_artifact_bytes: 10\n",
            "is not valid YAML: line 12, column 3: duplicate key 'max_artifact_bytes' "
            "(first on line 11): give each key once",
        ),
        (
            "name: probe\n" + HARDWARE + "budgets: {}\n",
            "is not valid YAML: line 2, column 1: duplicate key 'name' (first on line 1): "
            "give each key once",
        ),
    ],
)
def test_a_duplicate_key_is_refused_with_both_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "class.yaml"
    path.write_text(text)
    assert refusal(path) == expected


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "class.yaml"
    path.write_text(
        HARDWARE
        + "budgets:\n  <<: {p95_latency_ms: 30, max_accuracy_drop: 0.01}\n  p95_latency_ms: 20\n"
    )
    budgets = load_device_class(path).budgets
    assert (budgets.p95_latency_ms, budgets.max_accuracy_drop) == (20.0, 0.01)


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (
            "1",
            "budgets.max_accuracy_drop: 1 would allow an accuracy drop of 100 points: it is a "
            "fraction (0.01 = one point), and above 0.5 is refused as meant in percent: "
            "for 1 point write 0.01",
        ),
        ("5", "budgets.max_accuracy_drop: 5 would allow an accuracy drop of 500 points"),
        ("0.6", "for 0.6 points write 0.006"),
        ("1%", "expected a fraction (0.01 = one point of accuracy), got '1%': write 0.01"),
    ],
)
def test_an_accuracy_drop_above_half_is_taken_for_percent(
    tmp_path: Path, drop: str, expected: str
) -> None:
    assert expected in refusal(write_class(tmp_path, f"max_accuracy_drop: {drop}"))


def test_an_accuracy_drop_of_one_half_is_still_allowed(tmp_path: Path) -> None:
    dc = load_device_class(write_class(tmp_path, "max_accuracy_drop: 0.5"))
    assert dc.budgets.max_accuracy_drop == 0.5


def test_a_fidelity_in_percent_is_refused_with_the_fraction(tmp_path: Path) -> None:
    assert refusal(write_class(tmp_path, "min_fidelity: 98")).endswith(
        "budgets.min_fidelity: 98 is above 1: the value is a fraction (0.98 = 98 %): "
        "for 98 % write 0.98"
    )


@pytest.mark.parametrize(
    ("written", "expected"),
    [("5e6", 5_000_000), ("5.0e+6", 5_000_000), ("'5000000'", 5_000_000), ("2.5e3", 2500)],
)
def test_whole_byte_counts_may_use_scientific_notation(
    tmp_path: Path, written: str, expected: int
) -> None:
    budgets = load_device_class(write_class(tmp_path, f"max_artifact_bytes: {written}")).budgets
    assert budgets.max_artifact_bytes == expected
    assert isinstance(budgets.max_artifact_bytes, int)


def test_scientific_notation_still_reads_as_a_number_for_float_fields(tmp_path: Path) -> None:
    budgets = load_device_class(write_class(tmp_path, "p95_latency_ms: 1e3")).budgets
    assert budgets.p95_latency_ms == 1000.0


@pytest.mark.parametrize(
    ("budgets", "expected"),
    [
        (
            "max_artifact_bytes: 2.5e0",
            "budgets.max_artifact_bytes: expected a whole number of bytes (the unit is in the "
            "key's name), got '2.5e0'",
        ),
        (
            "p95_latency_ms: 20ms",
            "budgets.p95_latency_ms: expected a number in milliseconds (the unit is in the "
            "key's name), got '20ms': write 20",
        ),
        ("p95_latency_ms: 0.5 s", "got '0.5 s': write 500"),
        ("p95_latency_ms: fast", "in the key's name), got 'fast'"),
        (
            "max_artifact_bytes: 50MB",
            "budgets.max_artifact_bytes: expected a whole number of bytes (the unit is in the "
            "key's name), got '50MB': write 50000000",
        ),
        ("max_artifact_bytes: 2 MiB", "got '2 MiB': write 2097152"),
        (
            "energy_per_inference_mj: 0.1J",
            "budgets.energy_per_inference_mj: expected a number in millijoules (the unit, mJ, "
            "is in the key's name), got '0.1J': write 100",
        ),
        ("p95_latency_ms: .inf", "got inf"),
    ],
)
def test_a_unit_in_the_value_is_refused_pointing_at_the_key(
    tmp_path: Path, budgets: str, expected: str
) -> None:
    assert expected in refusal(write_class(tmp_path, budgets))


def test_a_unit_in_a_power_value_is_refused(tmp_path: Path) -> None:
    hardware = HARDWARE.replace("active_watts: 5", "active_watts: 5W")
    assert refusal(write_class(tmp_path, "", hardware)).endswith(
        "power.active_watts: expected a number in watts (the unit is in the key's name), "
        "got '5W': write 5"
    )


def test_every_bad_field_is_named_on_one_line(tmp_path: Path) -> None:
    message = refusal(write_class(tmp_path, "p95_latency_ms: 20ms\nmax_accuracy_drop: 2"))
    problems = message.removeprefix("is not a valid device class: ").split("; ")
    assert [p.split(":")[0] for p in problems] == [
        "budgets.p95_latency_ms",
        "budgets.max_accuracy_drop",
    ]


def test_flag_overrides_revalidate_the_whole_class() -> None:
    hub = load_device_class(ROOT / "deploy" / "device-classes" / "home-hub.yaml")
    with pytest.raises(ValidationError, match="exceeds model_storage_bytes"):
        hub.with_budgets(max_artifact_bytes=hub.model_storage_bytes + 1)
    with pytest.raises(ValidationError, match="refused as meant in percent"):
        hub.with_budgets(max_accuracy_drop=1)
    with pytest.raises(ValidationError, match="got true"):
        hub.with_budgets(p95_latency_ms=True)
    same = hub.with_budgets(max_artifact_bytes=hub.model_storage_bytes)
    assert same.budgets.max_artifact_bytes == hub.model_storage_bytes
    assert same.model_copy(update={"budgets": hub.budgets}) == hub
