"""The Store contract, run against every backend: SQL on a real SQLite file and on a real
PostgreSQL server (a private cluster the session starts, see tests/support/postgres.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from artifact.manifest import TensorSpec
from controller.db import create_schema, make_engine
from controller.errors import ErrorCode, FleetError
from controller.records import (
    ArtifactRecord,
    AssignTarget,
    ClassCount,
    DeviceRegistration,
    Encoding,
    FetchOutcome,
    Hardware,
    HeldArtifact,
    NewEvent,
    NewModel,
    Outcome,
    StatusUpdate,
    TargetKind,
    TelemetryWindow,
)
from controller.sql_store import SqlStore
from controller.store import Store, VersionConflictError, all_artifacts, all_devices
from tests.controller.helpers import sha256
from tests.support.postgres import PostgresCluster

SPEC = (TensorSpec(name="x", dtype="float32", shape=(-1, 4)),)
HW = Hardware(arch="x86_64", cpu_cores=4, memory_bytes=1 << 32, onnxruntime_version="1.32.0")


def new_model(name: str = "motions", data: bytes = b"v1") -> NewModel:
    return NewModel(name, sha256(data), len(data), SPEC, SPEC, "a test model")


def make_artifact(
    model: str, device_class: str, version: int, data: bytes = b"v1"
) -> ArtifactRecord:
    return ArtifactRecord(
        id=f"{model}/{device_class}/v{version}",
        model_name=model,
        model_version=1,
        device_class=device_class,
        version=version,
        sha256=sha256(data),
        size_bytes=len(data),
        manifest_json=b'{"m":1}',
        signature=b"sig",
        key_id="k",
        created_unix_ms=version,
    )


def registration(
    device_id: str = "hub-1", device_class: str = "home-hub", **kw: object
) -> DeviceRegistration:
    return DeviceRegistration(device_id, device_class, HW, **kw)  # type: ignore[arg-type]


def window(seq: int) -> TelemetryWindow:
    return TelemetryWindow(
        seq, "motions", sha256(b"v1"), 1000, 2000, 10, 0, (1, 2, 3), 0.5, 1.5, "estimate", 1 << 20
    )


class StoreContract:
    """Behaviour every Store backend must have; subclasses provide ``store``."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def test_models_get_versions_and_identical_bytes_do_not(self, store: Store) -> None:
        first, created = store.add_model(new_model())
        assert (first.version, created) == (1, True)
        same, created = store.add_model(new_model())
        assert (same.version, created) == (1, False)
        second, created = store.add_model(new_model(data=b"v2"))
        assert (second.version, created) == (2, True)
        assert store.get_model("motions") == second
        assert store.get_model("motions", 1) == first
        assert store.get_model("motions", 3) is None
        assert [m.version for m in store.list_models()] == [1, 2]
        store.add_model(new_model("intents"))
        keys = [(m.name, m.version) for m in store.list_models(limit=2)]
        assert keys == [("intents", 1), ("motions", 1)]
        assert [(m.name, m.version) for m in store.list_models(after=keys[-1])] == [("motions", 2)]
        assert second.inputs == SPEC

    def test_artifact_versions_are_per_model_and_class(self, store: Store) -> None:
        store.add_model(new_model())
        assert store.next_artifact_version("motions", "home-hub") == 1
        store.insert_artifact(make_artifact("motions", "home-hub", 1))
        assert store.next_artifact_version("motions", "home-hub") == 2
        assert store.next_artifact_version("motions", "speaker") == 1
        with pytest.raises(VersionConflictError):
            store.insert_artifact(
                dataclasses.replace(make_artifact("motions", "home-hub", 1), id="other-id")
            )
        got = store.get_artifact("motions/home-hub/v1")
        assert got is not None and got.manifest_json == b'{"m":1}' and got.signature == b"sig"
        assert store.find_artifact_by_sha256(sha256(b"v1")) == got
        assert store.find_artifact_by_sha256(sha256(b"nothing")) is None
        assert store.list_artifacts(device_class="speaker") == []

    def test_a_model_artifact_is_found_by_the_model_and_its_bytes(self, store: Store) -> None:
        """Two models with identical bytes: each one's own artifact, never the other's."""
        store.add_model(new_model("motions"))
        store.add_model(new_model("twin"))  # the same file under another name
        mine = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        newer = dataclasses.replace(make_artifact("motions", "speaker", 1), created_unix_ms=3)
        mine_newer = store.insert_artifact(newer)
        twin = dataclasses.replace(make_artifact("twin", "home-hub", 1), created_unix_ms=5)
        theirs = store.insert_artifact(twin)
        digest = sha256(b"v1")
        assert store.find_artifact_by_sha256(digest) == theirs  # any model's: the newest
        assert store.find_model_artifact("motions", digest) == mine_newer != mine
        assert store.find_model_artifact("twin", digest) == theirs
        assert store.find_model_artifact("nobody", digest) is None
        assert store.find_model_artifact("motions", sha256(b"nothing")) is None

    def test_a_fetch_without_an_event_still_adds_to_the_download_sums(self, store: Store) -> None:
        store.add_model(new_model())
        art = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        store.register_device(registration())
        events_before = len(store.list_events(0, 1000))
        for sent, completed in ((1, False), (2, True)):
            outcome = FetchOutcome(
                "hub-1", "motions", art.id, art.size_bytes, Encoding.FULL, sent, completed
            )
            store.record_fetch(None, outcome)
        (totals,) = store.download_totals()
        assert (totals.calls, totals.completed, totals.bytes_sent) == (2, 1, 3)
        assert len(store.list_events(0, 1000)) == events_before

    def test_register_then_reregister_or_conflict(self, store: Store) -> None:
        first = store.register_device(registration())
        assert not first.re_registered
        again = store.register_device(registration(agent_version="0.2"))
        assert again.re_registered and again.device.agent_version == "0.2"

        bigger = dataclasses.replace(
            registration(), hardware=dataclasses.replace(HW, memory_bytes=1)
        )
        with pytest.raises(FleetError) as caught:
            store.register_device(bigger)
        assert caught.value.code is ErrorCode.ALREADY_EXISTS
        assert "memory_bytes" in caught.value.message
        with pytest.raises(FleetError, match="device_class"):
            store.register_device(registration(device_class="speaker"))
        device = store.get_device("hub-1")
        assert device is not None and device.hardware == HW and device.device_class == "home-hub"
        assert len(store.list_events(0, 100, "device.registered")) == 2

    def test_held_artifacts_become_serving(self, store: Store) -> None:
        held = (
            HeldArtifact("motions", sha256(b"v1"), True),
            HeldArtifact("motions", sha256(b"v0"), False),
        )
        store.register_device(registration(held=held))
        (view,) = store.list_devices()
        assert [(m.model_name, m.serving_sha256) for m in view.models] == [
            ("motions", sha256(b"v1"))
        ]
        store.register_device(registration())
        (view,) = store.list_devices()
        assert view.models[0].serving_sha256 == ""

    def test_device_assignment_wins_over_class_and_revision_grows(self, store: Store) -> None:
        store.add_model(new_model())
        store.add_model(new_model(data=b"v2"))
        v1 = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        v2 = store.insert_artifact(
            dataclasses.replace(make_artifact("motions", "home-hub", 2, b"v2"), model_version=2)
        )
        store.register_device(registration("hub-1"))
        store.register_device(registration("hub-2"))
        assert store.desired_set("hub-1").assignments == ()
        assert store.desired_set("hub-1").revision == 0

        result = store.assign(v1, AssignTarget(TargetKind.CLASS, "home-hub"))
        assert result.changed and result.devices_affected == 2
        rev1 = store.desired_set("hub-1").revision
        assert [a.artifact_id for a in store.desired_set("hub-1").assignments] == [v1.id]

        unchanged = store.assign(v1, AssignTarget(TargetKind.CLASS, "home-hub"))
        assert not unchanged.changed and unchanged.devices_affected == 0

        store.assign(v2, AssignTarget(TargetKind.DEVICE, "hub-2"))
        assert [a.artifact_id for a in store.desired_set("hub-2").assignments] == [v2.id]
        assert store.desired_set("hub-2").revision > rev1
        assert store.desired_set("hub-1").revision == rev1
        # hub-2 follows its own assignment now, so a class change reaches one device
        again = store.assign(v2, AssignTarget(TargetKind.CLASS, "home-hub"))
        assert again.devices_affected == 1

    def test_status_reports_show_in_device_views(self, store: Store) -> None:
        store.add_model(new_model())
        art = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        store.register_device(registration())
        store.assign(art, AssignTarget(TargetKind.CLASS, "home-hub"))
        store.report_status(
            StatusUpdate(
                "hub-1",
                "motions",
                art.sha256,
                Outcome.ACTIVE,
                "switched",
                2,
                Encoding.FULL,
                art.sha256,
            )
        )
        (view,) = store.list_devices("home-hub")
        (state,) = view.models
        assert (state.desired_artifact_id, state.serving_artifact_id) == (art.id, art.id)
        assert (state.last_outcome, state.last_reason, state.bytes_received, state.encoding) == (
            Outcome.ACTIVE,
            "switched",
            2,
            Encoding.FULL,
        )
        assert not view.online
        store.touch_watch("hub-1", lease_until_ms=2**62)
        assert store.list_devices()[0].online
        store.release_watch("hub-1")
        assert not store.list_devices()[0].online
        assert store.list_devices("speaker") == []
        with pytest.raises(FleetError, match="not registered"):
            store.report_status(
                StatusUpdate("ghost", "motions", art.sha256, Outcome.FAILED, "x", 0, None, "")
            )

    def test_telemetry_is_stored_once_per_seq(self, store: Store) -> None:
        store.register_device(registration())
        store.add_model(new_model())
        store.insert_artifact(make_artifact("motions", "home-hub", 1))
        assert store.store_telemetry("hub-1", [window(1), window(2)]) == 2
        assert store.store_telemetry("hub-1", [window(2), window(3)]) == 3
        assert store.store_telemetry("hub-1", []) == 3

    def test_an_applied_update_is_counted_once_by_its_first_active_report(
        self, store: Store
    ) -> None:
        store.register_device(registration())
        store.add_model(new_model())
        artifact = make_artifact("motions", "home-hub", 1)
        store.insert_artifact(artifact)

        def report(outcome: Outcome, received: int, encoding: Encoding | None) -> None:
            sha = artifact.sha256
            store.report_status(
                StatusUpdate("hub-1", "motions", sha, outcome, "", received, encoding, sha)
            )

        report(Outcome.DOWNLOADING, 0, None)
        report(Outcome.ACTIVE, 700, Encoding.DELTA)
        report(Outcome.ACTIVE, 700, Encoding.DELTA)  # sent again after a reconnect
        report(Outcome.ACTIVE, 0, Encoding.FULL)  # found on disk: nothing downloaded
        (applied,) = store.applied_update_totals()
        assert (applied.artifact_id, applied.encoding, applied.updates) == (
            artifact.id, Encoding.DELTA, 1,
        )  # fmt: skip
        assert (applied.bytes_received, applied.full_bytes) == (700, artifact.size_bytes)

    def test_a_re_release_counts_downloads_and_updates_where_its_telemetry_does(
        self, store: Store
    ) -> None:
        """QA: a re-release's downloads were labelled with it, its applied updates and
        telemetry with the first artifact of those bytes; all now use the first."""
        store.register_device(registration())
        store.add_model(new_model())
        first = store.insert_artifact(make_artifact("motions", "home-hub", 1, b"v1"))
        store.insert_artifact(make_artifact("motions", "home-hub", 2, b"v2"))
        again = store.insert_artifact(make_artifact("motions", "home-hub", 3, b"v1"))
        store.record_fetch(
            None,
            FetchOutcome("hub-1", "motions", again.id, again.size_bytes, Encoding.FULL, 2, True),
        )
        sha = again.sha256
        store.report_status(
            StatusUpdate("hub-1", "motions", sha, Outcome.ACTIVE, "", 2, Encoding.FULL, sha)
        )
        (fetched,) = store.download_totals()
        (applied,) = store.applied_update_totals()
        assert fetched.artifact_id == applied.artifact_id == first.id  # as `_artifact_ids`

    def test_events_page_and_filter_by_literal_prefix(self, store: Store) -> None:
        for kind in ("a.one", "a.two", "b.one", "a%x", "a_y"):
            store.add_event(NewEvent(kind, "s", f"{kind} happened", {"k": kind}))
        assert [e.kind for e in store.list_events(0, 100, "a.")] == ["a.one", "a.two"]
        assert [e.kind for e in store.list_events(0, 100, "a%")] == ["a%x"]
        assert [e.kind for e in store.list_events(0, 100, "a_")] == ["a_y"]
        page = store.list_events(0, 2)
        assert [e.kind for e in page] == ["a.one", "a.two"]
        assert store.list_events(page[-1].id, 100)[0].kind == "b.one"
        assert page[0].detail == {"k": "a.one"}

    def test_artifacts_page_in_key_order_both_ways(self, store: Store) -> None:
        store.add_model(new_model())
        store.add_model(new_model("intents"))
        for model, cls, version in [
            ("motions", "home-hub", 1), ("motions", "home-hub", 2), ("motions", "camera", 1),
            ("intents", "home-hub", 1), ("motions", "home-hub", 10),
        ]:  # fmt: skip
            store.insert_artifact(make_artifact(model, cls, version))

        def ids(page: list[ArtifactRecord]) -> list[str]:
            return [a.id for a in page]

        everything = [
            "intents/home-hub/v1", "motions/camera/v1", "motions/home-hub/v1",
            "motions/home-hub/v2", "motions/home-hub/v10",  # versions compare as numbers
        ]  # fmt: skip
        assert ids(store.list_artifacts(limit=2)) == everything[:2]
        after = ("motions", "camera", 1)
        assert ids(store.list_artifacts(after=after, limit=10)) == everything[2:]
        newest = ids(store.list_artifacts("motions", "home-hub", newest_first=True, limit=2))
        assert newest == ["motions/home-hub/v10", "motions/home-hub/v2"]
        rest = store.list_artifacts(
            "motions", "home-hub", after=("motions", "home-hub", 2), newest_first=True
        )
        assert ids(rest) == ["motions/home-hub/v1"]
        assert ids(list(all_artifacts(store, device_class="home-hub", newest_first=True))) == [
            "motions/home-hub/v10", "motions/home-hub/v2", "motions/home-hub/v1",
            "intents/home-hub/v1",
        ]  # fmt: skip

    def test_devices_page_by_id_and_count_per_class(self, store: Store) -> None:
        for i in range(5):
            store.register_device(registration(f"dev-{i}", "camera" if i % 2 else "home-hub"))
        ids = [v.device.device_id for v in store.list_devices(limit=2)]
        assert ids == ["dev-0", "dev-1"]
        rest = [v.device.device_id for v in store.list_devices(after="dev-1", limit=10)]
        assert rest == ["dev-2", "dev-3", "dev-4"]
        cameras = store.list_devices("camera", after="dev-1")
        assert [v.device.device_id for v in cameras] == ["dev-3"]
        assert [v.device.device_id for v in all_devices(store, "home-hub")] == [
            "dev-0",
            "dev-2",
            "dev-4",
        ]
        store.touch_watch("dev-3", 1 << 62)  # a watch stream is open: online
        assert store.count_devices() == [ClassCount("camera", 2, 1), ClassCount("home-hub", 3, 0)]


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        engine = make_engine(f"sqlite:///{tmp_path / 'homefleet.db'}")
        create_schema(engine)
        yield SqlStore(engine)
        engine.dispose()

    def test_sqlite_runs_in_wal_mode_with_foreign_keys(self, tmp_path: Path) -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
        try:
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
                assert int(conn.execute(text("PRAGMA busy_timeout")).scalar() or 0) > 0
        finally:
            engine.dispose()


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store(self, postgres: PostgresCluster) -> Iterator[Store]:
        engine = make_engine(postgres.new_database())
        create_schema(engine)
        yield SqlStore(engine)
        engine.dispose()
