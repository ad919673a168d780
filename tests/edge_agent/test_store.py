"""Local state: verified artifacts, resumable part files, and an atomically replaced slots.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifact.digest import InvalidDigestError, sha256_bytes
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.store import ModelSlots, SlotRecord, SlotsFile, StateStore
from protos import fleet_pb2

A = sha256_bytes(b"a")
B = sha256_bytes(b"b")


def slots_with(active: str, previous: str | None = None) -> SlotsFile:
    signed = fleet_pb2.SignedManifest(manifest_json=b'{"k":1}', signature=b"\x01\x02", key_id="kid")
    return SlotsFile(
        models={
            "motions": ModelSlots(
                active=SlotRecord.from_signed(active, signed).activated_now(),
                previous=SlotRecord(sha256=previous) if previous else None,
            )
        }
    )


def test_slots_survive_a_new_store_instance_with_manifest_and_signature(tmp_path: Path) -> None:
    StateStore(tmp_path).save_slots(slots_with(A, B))
    loaded = StateStore(tmp_path).load_slots()
    held = loaded.models["motions"]
    assert held.active is not None and held.active.sha256 == A
    assert held.previous is not None and held.previous.sha256 == B
    signed = held.active.to_signed()
    assert signed.manifest_json == b'{"k":1}' and signed.signature == b"\x01\x02"
    assert signed.key_id == "kid"
    assert loaded.referenced() == {A, B}


def test_saving_replaces_the_file_whole_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_slots(slots_with(A))
    store.save_slots(slots_with(B, A))
    assert json.loads(store.slots_path.read_text())["models"]["motions"]["active"]["sha256"] == B
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_failed_save_leaves_the_previous_slots_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    store.save_slots(slots_with(A))
    before = store.slots_path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("artifact.files.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.save_slots(slots_with(B, A))
    monkeypatch.undo()
    assert store.slots_path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_corrupt_slots_file_is_reported_and_can_be_moved_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.slots_path.write_text('{"models": {"motions": {"active": {"sha256": "zz"}}}}')
    with pytest.raises(AgentError) as err:
        store.load_slots()
    assert err.value.code is ErrorCode.STATE_CORRUPT
    aside = store.quarantine_slots()
    assert aside.exists() and not store.slots_path.exists()
    assert store.load_slots() == SlotsFile()


@pytest.mark.parametrize("damage", [b"garbage\n", b"", b'{"models": {"m": {"active": 1}}}'])
def test_a_damaged_slots_file_gives_way_to_its_backup_floors_included(
    tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """QA: a corrupt slots.json reset the version floors, and the agent then accepted an
    older manifest than one it had run. Every save writes a backup first."""
    saved = slots_with(A, B)
    saved.models["motions"].version_floor["home-hub"] = 4
    StateStore(tmp_path).save_slots(saved)
    store = StateStore(tmp_path)
    store.slots_path.write_bytes(damage)
    loaded = store.load_slots()
    assert loaded == saved and loaded.models["motions"].version_floor == {"home-hub": 4}
    (aside,) = tmp_path.glob("slots.json.corrupt-*")
    assert aside.read_bytes() == damage
    (line,) = [r.getMessage() for r in caplog.records if "slots.backup.json" in r.getMessage()]
    assert "slots.json is not valid (" in line and "errors.pydantic.dev" not in line
    # the next save writes both again
    store.save_slots(loaded)
    assert store.load_slots() == saved and store.slots_path.read_bytes() == (
        store.slots_backup_path.read_bytes()
    )
    # with the backup damaged too, the agent is told (and starts with no models)
    store.slots_path.write_bytes(damage)
    store.slots_backup_path.write_bytes(b"also garbage")
    with pytest.raises(AgentError) as err:
        store.load_slots()
    assert err.value.code is ErrorCode.STATE_CORRUPT


def test_promote_moves_a_matching_part_file_into_artifacts(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    data = b"model bytes" * 100
    sha = sha256_bytes(data)
    store.partial_path(sha).write_bytes(data[:10])
    assert store.partial_size(sha) == 10  # a resume would start here
    with store.partial_path(sha).open("ab") as f:
        f.write(data[10:])
    path = store.promote_partial(sha)
    assert path == store.artifact_path(sha) and path.read_bytes() == data
    assert not store.partial_path(sha).exists()
    assert store.verify_artifact(sha)


def test_promote_refuses_a_mismatch_and_deletes_the_part_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    sha = sha256_bytes(b"expected")
    store.partial_path(sha).write_bytes(b"tampered")
    with pytest.raises(AgentError) as err:
        store.promote_partial(sha)
    assert err.value.code is ErrorCode.HASH_MISMATCH
    assert err.value.message == f"sha256 mismatch: expected {sha} got {sha256_bytes(b'tampered')}"
    assert not store.partial_path(sha).exists()
    assert not store.has_artifact(sha)


def test_verify_notices_corruption_on_disk(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.artifact_path(A).write_bytes(b"not a")
    assert store.has_artifact(A)
    assert not store.verify_artifact(A)
    assert not store.verify_artifact(B)  # missing


def test_only_digests_become_file_names(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for bad in ("../../etc/passwd", A.upper(), A[:-1], ""):
        with pytest.raises(InvalidDigestError):
            store.artifact_path(bad)
        with pytest.raises(InvalidDigestError):
            store.partial_path(bad)


def test_garbage_collection_keeps_what_slots_reference(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    c = sha256_bytes(b"c")
    for sha in (A, B, c):
        store.artifact_path(sha).write_bytes(b"x")
    assert store.collect_garbage({A, B}) == [c]
    assert store.has_artifact(A) and store.has_artifact(B) and not store.has_artifact(c)


def test_part_files_no_longer_wanted_are_dropped(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.partial_path(A).write_bytes(b"x")
    store.partial_path(B).write_bytes(b"y")
    assert store.discard_partials_except({A, "not-a-digest"}) == [B]
    assert store.partial_size(A) == 1 and store.partial_size(B) == 0


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.locked():
        with pytest.raises(AgentError) as err, StateStore(tmp_path).locked():
            pass
        assert err.value.code is ErrorCode.STATE_LOCKED
    with StateStore(tmp_path).locked():  # free again once the first one stopped
        pass


def test_agent_info_is_written_whole_and_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.write_agent_info("127.0.0.1:1234", "dev-1")
    info = json.loads(store.agent_info_path.read_text())
    assert info["local_api"] == "127.0.0.1:1234" and info["device_id"] == "dev-1"
    assert isinstance(info["pid"], int)
    store.remove_agent_info()
    assert not store.agent_info_path.exists()
