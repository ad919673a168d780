"""SyncLoop.check_manifest on manifests a real controller would never send.

The real controller signs every manifest with its key and refuses to assign an artifact
to a device of another class, so these refusals are checked here, on the agent's own
function, with manifests really signed (artifact.signing) and then altered. The
end-to-end refusal (FAILED report, old model kept, nothing downloaded) is covered with a
real controller in test_sync.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from artifact.digest import sha256_bytes
from artifact.keychain import endorse
from artifact.manifest import Manifest, RecipeStep, TensorSpec
from artifact.signing import SigningKey, TrustedKey
from edge_agent.agent import restore_slots
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.hardware import collect
from edge_agent.runtime import ModelRuntime
from edge_agent.store import SlotRecord, StateStore
from edge_agent.sync import SyncLoop
from protos import fleet_pb2
from tests.edge_agent.conftest import write_model
from tests.edge_agent.models import add_model

KEY = SigningKey.generate()
DATA = add_model(1.0)
SHA = sha256_bytes(DATA)
OTHER = sha256_bytes(add_model(2.0))


def manifest(**over: Any) -> Manifest:
    created = datetime.now(UTC).replace(microsecond=0)
    fields: dict[str, Any] = {
        "model_name": "motions",
        "model_version": 1,
        "device_class": "home-hub",
        "version": 1,
        "sha256": sha256_bytes(DATA),
        "size_bytes": len(DATA),
        "inputs": (TensorSpec(name="x", dtype="float32", shape=(-1, 4)),),
        "outputs": (TensorSpec(name="y", dtype="float32", shape=(-1, 4)),),
        "recipe": (RecipeStep(kind="identity"),),
        "created_at": created,
        "expires_at": created + timedelta(days=30),
    }
    fields.update(over)
    return Manifest.model_validate(fields)


def assignment(
    m: Manifest, *, key: SigningKey | None = KEY, raw: bytes | None = None
) -> fleet_pb2.Assignment:
    """``m`` signed by ``key`` (None: unsigned); ``raw``: bytes sent instead of the signed ones."""
    signed = m.to_json_bytes()
    return fleet_pb2.Assignment(
        model_name=m.model_name,
        artifact_sha256=m.sha256,
        size_bytes=m.size_bytes,
        manifest=fleet_pb2.SignedManifest(
            manifest_json=signed if raw is None else raw,
            signature=key.sign(signed) if key else b"",
            key_id=key.key_id if key else "",
        ),
    )


@pytest.fixture
def agent(tmp_path: Path) -> SyncLoop:
    config = AgentConfig(
        controller="127.0.0.1:1", device_id="dev-1", device_class="home-hub", state_dir=tmp_path
    )
    trusted = TrustedKey(KEY.private.public_key())
    return SyncLoop(config, StateStore(tmp_path), ModelRuntime(threads=1), collect(), trusted)


def refusal(agent: SyncLoop, a: fleet_pb2.Assignment) -> AgentError:
    with pytest.raises(AgentError) as info:
        agent.check_manifest(a)
    return info.value


def test_a_manifest_signed_by_the_pinned_key_for_this_class_is_accepted(agent: SyncLoop) -> None:
    m = manifest()
    assert agent.check_manifest(assignment(m)) == m


def test_a_manifest_for_another_device_class_is_refused(agent: SyncLoop) -> None:
    error = refusal(agent, assignment(manifest(device_class="camera")))
    assert error.code == ErrorCode.MANIFEST_MISMATCH
    assert "'camera'" in error.message and "'home-hub'" in error.message


def test_an_unsigned_manifest_is_refused(agent: SyncLoop) -> None:
    error = refusal(agent, assignment(manifest(), key=None))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST
    assert "unsigned" in error.message


def test_a_tampered_manifest_is_refused(agent: SyncLoop) -> None:
    m = manifest()
    tampered = m.to_json_bytes().replace(b'"version":1', b'"version":2')
    assert tampered != m.to_json_bytes()
    error = refusal(agent, assignment(m, raw=tampered))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST
    assert "does not verify" in error.message and KEY.key_id in error.message


def test_a_manifest_signed_by_another_key_is_refused(agent: SyncLoop) -> None:
    other = SigningKey.generate()
    error = refusal(agent, assignment(manifest(), key=other))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST
    assert "no endorsement that leads there" in error.message and other.key_id in error.message


def test_a_rotated_key_is_trusted_only_through_a_valid_endorsement(agent: SyncLoop) -> None:
    successor, attacker = SigningKey.generate(), SigningKey.generate()
    m = manifest()
    signed_by_successor = assignment(m, key=successor)
    forged = endorse(attacker, successor)  # endorsed by a key nobody pinned
    signed_by_successor.manifest.key_chain.append(forged.to_json_bytes())
    error = refusal(agent, signed_by_successor)
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST and "no chain" in error.message
    assert agent.trust is not None and agent.trust.current.key_id == KEY.key_id

    genuine = assignment(m, key=successor)
    genuine.manifest.key_chain.append(endorse(KEY, successor).to_json_bytes())
    assert agent.check_manifest(genuine) == m
    assert agent.trust.current.key_id == successor.key_id
    # the retired key no longer signs for this agent
    error = refusal(agent, assignment(m, key=KEY))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST


def test_a_manifest_older_than_one_the_device_ran_is_refused(agent: SyncLoop) -> None:
    agent.runtime.raise_floor("motions", "home-hub", 3, OTHER)
    error = refusal(agent, assignment(manifest(version=2)))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST
    assert "older than v3" in error.message
    newer = manifest(version=4)
    assert agent.check_manifest(assignment(newer)) == newer
    # the floor is per device class: another class's versions do not count here
    agent.runtime.raise_floor("motions", "camera", 9, OTHER)
    assert agent.check_manifest(assignment(newer)) == newer


def test_the_version_floor_survives_a_restart_even_when_the_artifact_is_lost(
    agent: SyncLoop,
) -> None:
    agent.store.artifacts_dir.mkdir(parents=True, exist_ok=True)
    path, _ = write_model(agent.store.artifacts_dir, DATA)
    agent.runtime.activate(agent.runtime.prepare("motions", path, SlotRecord(sha256=SHA)))
    agent.runtime.raise_floor("motions", "home-hub", 5, SHA)
    agent.store.save_slots(agent.runtime.snapshot())

    restarted = ModelRuntime(threads=1)
    restore_slots(agent.store, restarted)
    assert restarted.version_floor("motions", "home-hub") == 5
    assert restarted.get("motions").sha256 == SHA

    path.unlink()  # the artifact vanished: nothing to serve, but the floor must stay
    again = ModelRuntime(threads=1)
    restore_slots(agent.store, again)
    assert again.active("motions") is None
    assert again.version_floor("motions", "home-hub") == 5
    assert agent.store.load_slots().models["motions"].version_floor == {"home-hub": 5}


def test_a_reused_version_is_refused_only_for_other_bytes_than_it_was_accepted_with(
    agent: SyncLoop,
) -> None:
    """The device accepted SHA under v2, lost it on disk, and serves its older slot: the
    same v2 manifest is the way back (not a reused version); other bytes under v2 are."""
    agent.store.artifacts_dir.mkdir(parents=True, exist_ok=True)
    path, older = write_model(agent.store.artifacts_dir, add_model(3.0))
    agent.runtime.activate(agent.runtime.prepare("motions", path, SlotRecord(sha256=older)))
    agent.runtime.raise_floor("motions", "home-hub", 2, SHA)

    same = manifest(version=2)
    assert agent.check_manifest(assignment(same)) == same
    reused = manifest(version=2, sha256=OTHER)
    error = refusal(agent, assignment(reused))
    assert error.code == ErrorCode.UNTRUSTED_MANIFEST
    assert "reused version" in error.message and SHA in error.message and OTHER in error.message
    # the first bytes stay the floor's, also when others are activated under it later
    agent.runtime.raise_floor("motions", "home-hub", 2, OTHER)
    assert agent.runtime.floor_artifact("motions", "home-hub") == SHA


def test_a_slots_file_that_predates_floor_artifacts_loads_and_completes_them(
    agent: SyncLoop,
) -> None:
    """slots.json as an older agent wrote it (no floor_sha256), after the v2 artifact was
    lost on disk: the agent falls back to v1 and still knows v2's bytes."""
    artifacts = agent.store.artifacts_dir
    artifacts.mkdir(parents=True, exist_ok=True)
    _, older = write_model(artifacts, add_model(3.0))
    v1, v2 = manifest(version=1, sha256=older), manifest(version=2)

    def record(m: Manifest) -> dict[str, Any]:
        raw = m.to_json_bytes()
        signed = fleet_pb2.SignedManifest(manifest_json=raw, signature=KEY.sign(raw))
        return SlotRecord.from_signed(m.sha256, signed).model_dump(mode="json")

    legacy = {
        "schema_version": 1,
        "models": {
            "motions": {
                "active": record(v2),  # its artifact is gone: never written in this test
                "previous": record(v1),
                "version_floor": {"home-hub": 2},
            }
        },
    }
    agent.store.slots_path.write_text(json.dumps(legacy))

    runtime = ModelRuntime(threads=1)
    restore_slots(agent.store, runtime)
    assert runtime.get("motions").sha256 == older  # fell back to the previous slot
    assert runtime.floor_artifact("motions", "home-hub") == SHA
    held = agent.store.load_slots().models["motions"]  # rewritten: v2's slot is gone
    assert held.active is not None and held.active.sha256 == older and held.previous is None
    assert (held.version_floor, held.floor_sha256) == ({"home-hub": 2}, {"home-hub": SHA})
