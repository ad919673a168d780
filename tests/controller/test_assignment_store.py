"""Assignments in the Store, on every backend (SQLite file, real PostgreSQL): a device's
desired-set revision never goes down, removals included, and the artifact a device is
shown serving is the one it was sent when re-releases share its bytes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.db import create_schema, make_engine
from controller.records import AssignTarget, Outcome, StatusUpdate, TargetKind
from controller.sql_store import SqlStore
from controller.store import Store
from tests.controller.test_store import make_artifact, new_model, registration
from tests.support.postgres import PostgresCluster

HUB = AssignTarget(TargetKind.CLASS, "home-hub")


def own(device_id: str) -> AssignTarget:
    return AssignTarget(TargetKind.DEVICE, device_id)


def serving(store: Store, device_id: str, model: str = "motions") -> str:
    (view,) = [v for v in store.list_devices() if v.device.device_id == device_id]
    (state,) = [m for m in view.models if m.model_name == model]
    return state.serving_artifact_id


class AssignmentContract:
    @pytest.fixture
    def store(self) -> Iterator[Store]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def test_removing_a_newer_own_assignment_still_raises_the_revision(self, store: Store) -> None:
        """The device's own row (a later event) is removed and it falls back to its class's
        older row: its revision must still grow, and other devices' must not move."""
        store.add_model(new_model())
        store.add_model(new_model(data=b"v2"))
        store.add_model(new_model("intents"))
        v1 = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        v2 = store.insert_artifact(
            dataclasses.replace(make_artifact("motions", "home-hub", 2, b"v2"), model_version=2)
        )
        intents = store.insert_artifact(make_artifact("intents", "home-hub", 1))
        store.register_device(registration("hub-1"))
        store.register_device(registration("hub-2"))
        store.assign(v1, HUB)
        class_revision = store.desired_set("hub-2").revision
        store.assign(v2, own("hub-1"))
        seen = store.desired_set("hub-1").revision
        assert seen > class_revision
        assert store.assigned(own("hub-1"), "motions") == v2
        assert store.assigned(HUB, "motions") == v1
        assert store.assigned(own("hub-2"), "motions") is None

        removed = store.unassign("motions", "hub-1")
        assert removed is not None and removed.artifact_id == v1.id
        after = store.desired_set("hub-1")
        assert [a.artifact_id for a in after.assignments] == [v1.id]
        assert after.revision > seen
        assert after.revision == removed.revision
        assert store.desired_set("hub-2").revision == class_revision  # not its change
        assert store.unassign("motions", "hub-1") is None

        # a model only the device had: its set loses it, the revision still grows
        store.assign(intents, own("hub-1"))
        seen = store.desired_set("hub-1").revision
        assert store.unassign("intents", "hub-1") is not None
        emptier = store.desired_set("hub-1")
        assert [a.model_name for a in emptier.assignments] == ["motions"]
        assert emptier.revision > seen

        # and a later class change lifts it past the removal
        store.assign(v2, HUB)
        assert store.desired_set("hub-1").revision > emptier.revision

    def test_serving_names_the_artifact_the_device_was_sent(self, store: Store) -> None:
        """v1 and v3 share bytes (v3 re-releases them); a device serving them while it is
        sent other bytes shows v3, the newest of its class, not v1 where they began."""
        store.add_model(new_model())
        store.add_model(new_model(data=b"v2"))
        v1 = store.insert_artifact(make_artifact("motions", "home-hub", 1))
        store.insert_artifact(
            dataclasses.replace(make_artifact("motions", "home-hub", 2, b"v2"), model_version=2)
        )
        v3 = store.insert_artifact(make_artifact("motions", "home-hub", 3))
        v4 = store.insert_artifact(
            dataclasses.replace(make_artifact("motions", "home-hub", 4, b"v2"), model_version=2)
        )
        store.insert_artifact(make_artifact("motions", "speaker", 9))  # same bytes, newer
        store.register_device(registration("hub-1"))
        store.report_status(
            StatusUpdate("hub-1", "motions", v1.sha256, Outcome.ACTIVE, "", 2, None, v1.sha256)
        )
        store.assign(v3, HUB)
        assert serving(store, "hub-1") == v3.id  # the desired one holds the bytes
        store.assign(v4, HUB)  # other bytes: the device still serves v3's
        assert serving(store, "hub-1") == v3.id
        store.assign(v1, own("hub-1"))
        assert serving(store, "hub-1") == v1.id  # it was sent v1 itself


class TestSqliteAssignments(AssignmentContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        engine = make_engine(f"sqlite:///{tmp_path / 'homefleet.db'}")
        create_schema(engine)
        yield SqlStore(engine)
        engine.dispose()


class TestPostgresAssignments(AssignmentContract):
    @pytest.fixture
    def store(self, postgres: PostgresCluster) -> Iterator[Store]:
        engine = make_engine(postgres.new_database())
        create_schema(engine)
        yield SqlStore(engine)
        engine.dispose()
