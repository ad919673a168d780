"""Fixtures shared by the controller tests: one private PostgreSQL cluster per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresCluster, running_cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """Started on first use only: tests that never ask for it never start a server."""
    with running_cluster() as started:
        yield started


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None for the embedded default (SQLite in the data directory), else a fresh
    PostgreSQL database: a test taking it runs once on each."""
    if request.param == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.new_database()
