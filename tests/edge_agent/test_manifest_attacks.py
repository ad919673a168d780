"""Every manifest attack, end to end: a real controller whose database an attacker
changed serves the bad manifest over real gRPC; the agent refuses it, reports why, and
keeps serving the model it had.

The controller never makes these manifests itself (it signs everything, refuses to go
back in versions and re-releases instead), so the tests play the attacker where one
would sit: in the controller's database, between signing and sending.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from artifact.manifest import Manifest, utc_now
from artifact.signing import TrustedKey
from controller.keys import load_signing_key
from tests.edge_agent.models import add_model
from tests.edge_agent.test_sync import (
    HEARTBEAT_S,
    Report,
    deploy,
    expect_failure,
    reports,
    running_agent,
)
from tests.support.controller import Controller, eventually, running_controller

Attack = Callable[[Controller, sqlite3.Connection, str], None]


def _attack_then_expect_refusal(tmp_path: Path, attack: Attack, *reason: str) -> None:
    """Deploy v1, then make v2, corrupt it with ``attack``, assign it: v1 must stay."""

    async def main() -> None:
        async with running_controller(tmp_path / "ctl", heartbeat_seconds=HEARTBEAT_S) as c:
            pinned = TrustedKey.from_pem(c.public_key_path.read_bytes())
            async with running_agent(tmp_path / "agent", c.address, trusted=pinned) as agent:
                old = (await deploy(c, agent, add_model(1.0))).sha256
                model = await c.add_model("motions", add_model(2.0))
                new = await c.create_artifact("motions", "home-hub", model.version)
                with sqlite3.connect(c.data_dir / "homefleet.db") as db:
                    attack(c, db, new.id)
                await c.assign(new.id, device_class="home-hub")
                said = await expect_failure(c, agent, old, new.sha256)
                for text in reason:
                    assert text in said, said
                assert not agent.store.has_artifact(new.sha256)  # nothing fetched

    asyncio.run(main())


def _manifest(db: sqlite3.Connection, artifact_id: str) -> Manifest:
    (raw,) = db.execute(
        "SELECT manifest_json FROM artifacts WHERE id = ?", (artifact_id,)
    ).fetchone()
    return Manifest.from_json_bytes(bytes(raw))


def _store(db: sqlite3.Connection, artifact_id: str, raw: bytes, signature: bytes) -> None:
    db.execute(
        "UPDATE artifacts SET manifest_json = ?, signature = ? WHERE id = ?",
        (raw, signature, artifact_id),
    )


def test_a_tampered_manifest_is_refused_end_to_end(tmp_path: Path) -> None:
    def tamper(c: Controller, db: sqlite3.Connection, artifact_id: str) -> None:
        m = _manifest(db, artifact_id)
        (signature,) = db.execute(
            "SELECT signature FROM artifacts WHERE id = ?", (artifact_id,)
        ).fetchone()
        forged = m.model_copy(update={"metrics": {"accuracy": 1.0}}).to_json_bytes()
        _store(db, artifact_id, forged, bytes(signature))  # the old signature, new bytes

    _attack_then_expect_refusal(tmp_path, tamper, "does not verify")


def test_an_unsigned_manifest_is_refused_end_to_end(tmp_path: Path) -> None:
    def strip(c: Controller, db: sqlite3.Connection, artifact_id: str) -> None:
        m = _manifest(db, artifact_id)
        _store(db, artifact_id, m.to_json_bytes(), b"")

    _attack_then_expect_refusal(tmp_path, strip, "unsigned")


def test_an_expired_manifest_is_refused_end_to_end(tmp_path: Path) -> None:
    """A genuinely signed manifest whose time is up (a freeze attack replays such)."""

    def expire(c: Controller, db: sqlite3.Connection, artifact_id: str) -> None:
        key = load_signing_key(c.data_dir / "keys")
        m = _manifest(db, artifact_id)
        past = utc_now() - timedelta(days=2)
        stale = m.model_copy(update={"created_at": past - timedelta(days=30), "expires_at": past})
        raw = stale.to_json_bytes()
        _store(db, artifact_id, raw, key.sign(raw))

    _attack_then_expect_refusal(tmp_path, expire, "expired")


def test_a_replayed_older_manifest_is_refused_end_to_end(tmp_path: Path) -> None:
    """Version 1, genuinely signed, assigned again behind the controller's back."""

    async def main() -> None:
        async with running_controller(tmp_path / "ctl", heartbeat_seconds=HEARTBEAT_S) as c:
            pinned = TrustedKey.from_pem(c.public_key_path.read_bytes())
            async with running_agent(tmp_path / "agent", c.address, trusted=pinned) as agent:
                v1 = await deploy(c, agent, add_model(1.0))
                v2 = await deploy(c, agent, add_model(2.0))
                before = len(await reports(c, v1.sha256))
                with sqlite3.connect(c.data_dir / "homefleet.db") as db:
                    db.execute("UPDATE assignments SET artifact_id = ?", (v1.id,))

                # no notification: the controller's heartbeat resends the (changed) set
                async def new_report() -> Report | None:
                    found = await reports(c, v1.sha256)
                    return found[-1] if len(found) > before else None

                report = await eventually("the agent's report on the replay", new_report)
                assert report["outcome"] == "failed", report
                assert "older than v2" in report["reason"], report
                assert report["serving_sha256"] == v2.sha256
                assert agent.runtime.get("motions").sha256 == v2.sha256

    asyncio.run(main())
