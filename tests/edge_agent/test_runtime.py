"""Spare-slot loading, self-test, atomic switch with the previous slot kept, and restore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import pytest

from artifact.digest import sha256_bytes
from artifact.runtime_hints import METADATA_KEY
from edge_agent.agent import restore_slots
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.runtime import ModelRuntime
from edge_agent.store import ModelSlots, SlotRecord, SlotsFile, StateStore
from tests.edge_agent.conftest import load, write_model
from tests.edge_agent.models import add_model

X = np.zeros((2, 4), np.float32)


def test_a_loaded_slot_serves_and_the_replaced_one_is_kept(tmp_path: Path) -> None:
    runtime = ModelRuntime(threads=1)
    first = load(runtime, tmp_path, "m", add_model(1.0))
    assert runtime.activate(first) is None
    second = load(runtime, tmp_path, "m", add_model(2.0))
    assert runtime.get("m") is first  # loading in a spare slot changes nothing yet
    assert runtime.activate(second) is first
    assert runtime.get("m") is second and runtime.previous("m") is first
    np.testing.assert_array_equal(runtime.get("m").run({"x": X})["y"], X + 2)
    assert runtime.switch_back("m") is first
    assert runtime.get("m") is first and runtime.previous("m") is second
    snapshot = runtime.snapshot().models["m"]
    assert snapshot.active is not None and snapshot.active.sha256 == first.sha256
    assert snapshot.previous is not None and snapshot.previous.sha256 == second.sha256


def test_a_model_with_nan_outputs_fails_self_test_and_the_old_one_keeps_serving(
    tmp_path: Path,
) -> None:
    runtime = ModelRuntime(threads=1)
    good = load(runtime, tmp_path, "m", add_model(1.0))
    runtime.activate(good)
    with pytest.raises(AgentError) as err:
        load(runtime, tmp_path, "m", add_model(float("nan")))
    assert err.value.code is ErrorCode.SELF_TEST_FAILED
    assert "'y'" in err.value.message and "non-finite" in err.value.message
    assert runtime.get("m") is good and runtime.previous("m") is None


def test_a_file_onnxruntime_refuses_fails_to_load_and_the_old_one_keeps_serving(
    tmp_path: Path,
) -> None:
    runtime = ModelRuntime(threads=1)
    good = load(runtime, tmp_path, "m", add_model(1.0))
    runtime.activate(good)
    with pytest.raises(AgentError) as err:
        load(runtime, tmp_path, "m", b"this is not an onnx model")
    assert err.value.code is ErrorCode.LOAD_FAILED
    assert runtime.get("m") is good


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(AgentError) as err:
        ModelRuntime(threads=1).get("missing")
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND


def _state_with(tmp_path: Path, active: bytes, previous: bytes) -> tuple[StateStore, str, str]:
    store = StateStore(tmp_path / "state")
    _, a = write_model(store.artifacts_dir, active)
    _, p = write_model(store.artifacts_dir, previous)
    store.save_slots(
        SlotsFile(
            models={"m": ModelSlots(active=SlotRecord(sha256=a), previous=SlotRecord(sha256=p))}
        )
    )
    return store, a, p


def test_restore_serves_the_active_artifact_and_keeps_the_previous(tmp_path: Path) -> None:
    store, active, previous = _state_with(tmp_path, add_model(2.0), add_model(1.0))
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    assert runtime.get("m").sha256 == active
    slot = runtime.previous("m")
    assert slot is not None and slot.sha256 == previous


def test_restore_falls_back_to_the_previous_slot_when_the_active_file_is_corrupt(
    tmp_path: Path,
) -> None:
    store, active, previous = _state_with(tmp_path, add_model(2.0), add_model(1.0))
    store.artifact_path(active).write_bytes(b"bit rot")
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    assert runtime.get("m").sha256 == previous
    assert runtime.previous("m") is None
    held = store.load_slots().models["m"]  # the slot table now says what is really served
    assert held.active is not None and held.active.sha256 == previous and held.previous is None


def test_restore_serves_nothing_for_a_model_with_no_usable_artifact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, active, previous = _state_with(tmp_path, add_model(2.0), add_model(1.0))
    store.artifact_path(active).unlink()
    store.artifact_path(previous).write_bytes(b"bit rot")
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    assert runtime.model_names() == []
    assert "no usable artifact" in caplog.text
    assert store.load_slots().models == {}


def test_restore_moves_an_unreadable_slots_file_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.slots_path.write_text("{not json")
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    assert runtime.model_names() == []
    assert list(tmp_path.glob("slots.json.corrupt-*"))


def test_self_test_inputs_respect_static_dims(tmp_path: Path) -> None:
    from edge_agent.runtime import synthetic_inputs

    runtime = ModelRuntime(threads=1)
    slot = load(runtime, tmp_path, "m", add_model(1.0))
    feeds = synthetic_inputs(slot.inputs)
    assert feeds["x"].shape == (1, 4) and feeds["x"].dtype == np.float32
    assert sha256_bytes(add_model(1.0)) == slot.sha256


def test_freed_heap_is_returned_after_loading_on_glibc() -> None:
    """glibc keeps what onnxruntime freed while folding constants at load unless trimmed
    (resident memory is a benchmark's business, not asserted here)."""
    import platform

    from edge_agent.runtime import release_free_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_free_memory() is expected


def test_sessions_do_not_spin_between_requests() -> None:
    """Pool threads that spin after each run burn a core between a device's occasional
    requests (measured: 22 ms of CPU per call against 1.3 ms, for 12 % more latency)."""
    from edge_agent.runtime import session_options

    options = session_options(2)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


def test_a_slot_applies_the_session_settings_its_artifact_asks_for(tmp_path: Path) -> None:
    """The planner measured the artifact with these settings (artifact.runtime_hints);
    the agent runs it with them too, and ignores settings outside the allow-list."""
    runtime = ModelRuntime(threads=1)
    key = "session.disable_quant_qdq"
    asked = with_metadata(add_model(1.0), {METADATA_KEY: f'{{"{key}": "1"}}'})
    slot = load(runtime, tmp_path, "m", asked)
    assert slot.session.get_session_options().get_session_config_entry(key) == "1"
    np.testing.assert_array_equal(slot.run({"x": X})["y"], X + 1)

    plain = load(runtime, tmp_path, "p", add_model(1.0))
    hostile = with_metadata(add_model(2.0), {METADATA_KEY: '{"session.use_env_allocators": "1"}'})
    ignored = load(runtime, tmp_path, "h", hostile)
    for unhinted in (plain, ignored):
        options = unhinted.session.get_session_options()
        for absent in (key, "session.use_env_allocators"):
            with pytest.raises(Exception, match="does not have configuration with key"):
                options.get_session_config_entry(absent)


def with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    model = onnx.load_from_string(data)
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()
