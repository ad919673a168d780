"""The blob store: content-addressed, atomic, and deaf to anything that is not a digest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifact.digest import InvalidDigestError
from controller.blobstore import BlobSizeError, BlobStore
from tests.controller.helpers import sha256


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_names_bytes_by_digest_in_a_two_level_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"some model bytes" * 1000
    ref = store.put([data[:100], data[100:]])
    digest = sha256(data)
    assert (ref.sha256, ref.size, ref.created) == (digest, len(data), True)
    assert store.path_for(digest) == tmp_path / "blobs" / "sha256" / digest[:2] / digest
    assert store.exists(digest) and store.size(digest) == len(data)
    assert store.read(digest) == data
    assert store.digests() == [digest]
    assert store.temp_files() == []

    again = store.put_bytes(data)
    assert again.created is False and again.sha256 == digest
    assert files_under(tmp_path / "blobs") == [store.path_for(digest)]


def test_a_failed_put_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")

    def broken_stream() -> Iterator[bytes]:
        yield b"first part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put(broken_stream())
    assert files_under(tmp_path / "blobs") == []


def test_staging_without_commit_and_an_overflow_leave_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    with store.staging() as staged:
        staged.write(b"abc")
        staged.flush()
        assert staged.path.read_bytes() == b"abc"
    with pytest.raises(BlobSizeError), store.staging(limit=4) as staged:
        staged.write(b"abc")
        staged.write(b"de")
    assert files_under(tmp_path / "blobs") == []


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../../etc/passwd",
        "/etc/passwd",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        ("ab/" + "c" * 61),
        "g" * 64,
        "a" * 63 + "\n",
    ],
)
def test_invalid_digests_are_refused_before_any_path_use(tmp_path: Path, bad: str) -> None:
    store = BlobStore(tmp_path / "blobs")
    before = sorted(p for p in (tmp_path).rglob("*"))
    for operation in (
        store.path_for,
        store.exists,
        store.size,
        store.open,
        store.read,
        store.delete,
    ):
        with pytest.raises(InvalidDigestError, match="64 lowercase hex"):
            operation(bad)
    assert sorted(p for p in (tmp_path).rglob("*")) == before


def test_unknown_digest_is_file_not_found(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = sha256(b"never stored")
    assert not store.exists(digest)
    with pytest.raises(FileNotFoundError):
        store.size(digest)
    with pytest.raises(FileNotFoundError):
        store.open(digest)


def test_only_stale_temporaries_are_swept(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    old = tmp_path / "blobs" / "tmp" / "upload-old.tmp"
    fresh = tmp_path / "blobs" / "tmp" / "upload-fresh.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    long_ago = time.time() - 3 * 24 * 3600
    os.utime(old, (long_ago, long_ago))
    assert store.remove_stale_temp_files() == 1
    assert store.temp_files() == [fresh]
