"""Content-addressed blob store: bytes are named by their sha256 and written atomically.

Layout: ``blobs/sha256/<first 2 hex>/<digest>``; uploads are staged in ``blobs/tmp/``
(same file system, so the final rename is atomic) and fsynced before the rename. A
digest string is checked with ``check_sha256`` before it becomes part of any path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from artifact.digest import check_sha256
from artifact.files import fsync_dir

STALE_TEMP_SECONDS = 24 * 3600


class BlobSizeError(ValueError):
    """More bytes arrived than the staged blob may hold."""


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    created: bool  # False when the store already held these bytes


class StagedBlob:
    """Bytes being written to a temporary file, hashed on the way; nothing is visible yet.

    ``commit`` moves them to their digest's path; leaving the ``BlobStore.staging``
    block without committing deletes the temporary file.
    """

    def __init__(self, store: BlobStore, file: BinaryIO, path: Path, limit: int | None) -> None:
        self._store = store
        self._file = file
        self.path = path
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed: BlobRef | None = None

    def write(self, data: bytes) -> None:
        if self.committed is not None:
            raise RuntimeError("blob already committed")
        if self._limit is not None and self.size + len(data) > self._limit:
            raise BlobSizeError(f"more than {self._limit} bytes")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        """Make the bytes readable through ``path`` (e.g. to validate before committing)."""
        self._file.flush()

    def commit(self) -> BlobRef:
        """fsync, then rename into place; if the digest is already stored, keep the old copy."""
        if self.committed is not None:
            return self.committed
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self.sha256
        final = self._store.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        created = not final.exists()
        if created:
            os.chmod(self.path, 0o444)
            os.replace(self.path, final)
            fsync_dir(final.parent)
        else:
            self.path.unlink(missing_ok=True)
        self.committed = BlobRef(digest, self.size, created)
        return self.committed


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects = root / "sha256"
        self._tmp = root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        """The path of a digest's blob; raises InvalidDigestError before touching any path."""
        digest = check_sha256(sha256)
        return self._objects / digest[:2] / digest

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def size(self, sha256: str) -> int:
        """Size in bytes; FileNotFoundError when the store does not hold the digest."""
        return self.path_for(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        """Open a blob for reading; FileNotFoundError when the store does not hold it."""
        return self.path_for(sha256).open("rb")

    def read(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def delete(self, sha256: str) -> None:
        """Remove a blob (used to undo a commit whose metadata row could not be written)."""
        path = self.path_for(sha256)
        path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def staging(self, *, limit: int | None = None) -> Iterator[StagedBlob]:
        """A temporary blob; deleted on exit unless committed inside the block."""
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tmp", dir=self._tmp)
        path = Path(name)
        file = os.fdopen(fd, "wb")
        try:
            yield StagedBlob(self, file, path, limit)
        finally:
            file.close()
            path.unlink(missing_ok=True)

    def put(self, chunks: Iterable[bytes]) -> BlobRef:
        with self.staging() as staged:
            for chunk in chunks:
                staged.write(chunk)
            return staged.commit()

    def put_bytes(self, data: bytes) -> BlobRef:
        return self.put([data])

    def digests(self) -> list[str]:
        """Every stored digest (for tests and maintenance; the store never lists on a hot path)."""
        return sorted(p.name for p in self._objects.glob("??/*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted(self._tmp.iterdir())

    def remove_stale_temp_files(self, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Delete uploads abandoned by a crash; recent ones may belong to another replica."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
