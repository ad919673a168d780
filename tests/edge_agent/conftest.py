"""Shared fixtures: small models on disk, and a short directory for unix sockets."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifact.digest import sha256_bytes
from edge_agent.runtime import ModelRuntime, ModelSlot
from edge_agent.store import SlotRecord
from tests.edge_agent.models import add_model, two_input_model


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: unix socket paths must fit in 107 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="hf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_model(directory: Path, data: bytes) -> tuple[Path, str]:
    sha = sha256_bytes(data)
    path = directory / f"{sha}.onnx"
    path.write_bytes(data)
    return path, sha


def load(runtime: ModelRuntime, directory: Path, name: str, data: bytes) -> ModelSlot:
    path, sha = write_model(directory, data)
    return runtime.prepare(name, path, SlotRecord(sha256=sha))


@pytest.fixture
def two_input_bytes() -> bytes:
    return two_input_model()


@pytest.fixture
def add_bytes() -> bytes:
    return add_model(1.0)
