"""Device-class files: the shipped examples load, malformed ones are refused by field."""

from __future__ import annotations

from pathlib import Path

import pytest

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
