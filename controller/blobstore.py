"""Content-addressed blob store: bytes are named by their sha256 and written atomically.

Layout: ``blobs/sha256/<first 2 hex>/<digest>``; uploads are staged in ``blobs/tmp/``
(same file system, so the final rename is atomic) and fsynced before the rename. A
digest string is checked with ``check_sha256`` before it becomes part of any path.

A stored blob can still rot (a failing disk, a bad copy, an edit under the store), so
readers that hand bytes on check them: ``open_verified`` hashes everything it reads from
byte 0 and checks the digest before it returns the last bytes. A blob found corrupt is
recorded in ``blobs/corrupt/<digest>.json`` (``mark_corrupt``, naming the very file that
was read, by its open descriptor; ``known_corrupt`` answers from it at once while that
file is still the blob's), and storing the same bytes again repairs it: ``commit`` checks
the copy it would keep, replaces a corrupt one, which it moves to ``blobs/corrupt/`` as
evidence (one copy per digest: a later repair's replaces an earlier one's, so repairs
repeated by a failing disk cannot fill the volume with copies), and clears the record
whenever the copy it keeps is sound.

Hashing a whole blob to resume a download at its end costs as much as sending it, so a
blob hashed whole lately is remembered (``RecentlyVerified``, by the identity of the file
hashed, for ``VERIFIED_TTL_SECONDS`` unless configured otherwise: the controller config's
``verified_blob_trust_seconds``): a resumed read of the same file skips its prefix
instead of hashing it. Bit rot in place changes no identity, so it is caught by the
first full hash after that time (and, on a device, by its own digest check).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from artifact.digest import check_sha256, sha256_file
from artifact.files import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 24 * 3600
READ_BLOCK = 1 << 20  # hashing a prefix that is not sent: memory stays flat
# How long a blob hashed whole is trusted to hold the same bytes while its file is the
# same (inode, size, mtime): the longest bit rot in place goes unnoticed by resumed reads.
VERIFIED_TTL_SECONDS = 600.0
MAX_VERIFIED = 4096  # blobs remembered at most (~200 bytes each); the oldest go first


class BlobSizeError(ValueError):
    """More bytes arrived than the staged blob may hold."""


@dataclass(frozen=True)
class FileIdentity:
    """Which file a corruption record is about: a changed file is checked again."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        return cls.from_stat(path.stat())

    @classmethod
    def of_open(cls, file: BinaryIO) -> FileIdentity:
        """The file an open descriptor reads, even after another was renamed over its path."""
        return cls.from_stat(os.fstat(file.fileno()))

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


class CorruptBlobError(Exception):
    """A stored blob whose bytes no longer hash to its name."""

    def __init__(
        self,
        sha256: str,
        actual_sha256: str,
        size: int,
        *,
        expected_size: int | None = None,
        file: FileIdentity | None = None,
    ) -> None:
        super().__init__(
            f"blob {sha256} is corrupt: its {size} stored bytes hash to {actual_sha256}"
        )
        self.sha256 = sha256
        self.actual_sha256 = actual_sha256
        self.size = size  # the bytes found (fewer than expected when the file was cut short)
        self.expected_size = expected_size  # the bytes it should have had, when known
        self.file = file  # the file that was read (None: whatever is at the path now)

    @property
    def wrong_size(self) -> bool:
        """The file is not as long as the blob (cut short, or lengthened)."""
        return self.expected_size is not None and self.size != self.expected_size


class RecentlyVerified:
    """Blobs hashed whole lately, each with the identity of the file that was hashed.

    A read of the same file (same inode, size and mtime) within ``ttl_seconds`` may trust
    its bytes instead of hashing them again; any change of the file, or the time running
    out, means hashing again. Bounded (the least recently noted go first) and shared by
    the threads that read blobs.
    """

    def __init__(
        self,
        ttl_seconds: float = VERIFIED_TTL_SECONDS,
        max_entries: int = MAX_VERIFIED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[int, FileIdentity, float]] = OrderedDict()

    def note(self, sha256: str, size: int, file: FileIdentity) -> None:
        """``file``'s first ``size`` bytes were just hashed and match ``sha256``."""
        with self._lock:
            self._entries[sha256] = (size, file, self._clock())
            self._entries.move_to_end(sha256)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def holds(self, sha256: str, size: int, file: FileIdentity) -> bool:
        """Whether ``file``'s first ``size`` bytes were found sound less than the TTL ago."""
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                return False
            fresh = self._clock() - entry[2] < self._ttl
            if entry[0] == size and entry[1] == file and fresh:
                return True
            del self._entries[sha256]  # another file, or too long ago: hash it again
            return False

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._entries.pop(sha256, None)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    created: bool  # False when the store already held these bytes
    repaired: bool = False  # the held copy was corrupt and these bytes replaced it


class VerifiedReader:
    """A blob's first ``size`` bytes, read from any offset and hashed from byte 0.

    ``skip_to`` reads and hashes the bytes a resumed download does not send; the read (or
    skip) that reaches ``size`` checks the digest before it returns, so a caller that
    sends what it reads never sends the last bytes of a corrupt blob, and a client that
    checks the digest itself never receives all of them. A file of another size than
    ``size`` is corrupt at once (cut short, or lengthened: a blob holds exactly its bytes),
    and one that shrinks while it is read when its bytes run out. A file found sound lately
    (``verified``) is trusted instead: ``skip_to`` seeks past the prefix, and nothing is
    hashed. Blocking: call it in a thread.
    """

    def __init__(
        self,
        file: BinaryIO,
        sha256: str,
        size: int,
        verified: RecentlyVerified | None = None,
    ) -> None:
        self._file = file
        self._sha256 = sha256
        self._size = size
        self._hash: hashlib._Hash | None = hashlib.sha256()
        self._verified = verified
        self.position = 0
        try:
            self.file = FileIdentity.of_open(file)  # the file read, whatever the path holds
            if self.file.size != size:
                raise self._corrupt("", found=self.file.size)
        except BaseException:
            file.close()
            raise
        self.trusted = verified is not None and verified.holds(sha256, size, self.file)

    def __enter__(self) -> VerifiedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file.close()

    def skip_to(self, offset: int) -> None:
        """Hash the bytes before ``offset`` (at most ``size``) without returning them;
        a trusted file's are not read at all."""
        until = min(offset, self._size)
        if self.trusted and self.position == 0 and until > 0:
            self._file.seek(until)
            self.position = until
            self._hash = None  # a partial hash could never be checked
            return
        while self.position < until:
            self._take(min(READ_BLOCK, until - self.position))
        self._check_at_end()

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes at most (b"" at ``size``), hashed on the way."""
        data = self._take(min(n, self._size - self.position))
        self._check_at_end()
        return data

    def _take(self, n: int) -> bytes:
        if n <= 0:
            return b""
        data = self._file.read(n)
        if not data:  # the file ends before the size it should have
            raise self._corrupt("" if self._hash is None else self._hash.hexdigest())
        if self._hash is not None:
            self._hash.update(data)
        self.position += len(data)
        return data

    def _check_at_end(self) -> None:
        if self.position == self._size and self._hash is not None:
            actual = self._hash.hexdigest()
            if actual != self._sha256:
                raise self._corrupt(actual)
            if self._verified is not None:
                self._verified.note(self._sha256, self._size, self.file)
            self._hash = None  # checked once

    def _corrupt(self, actual_sha256: str, found: int | None = None) -> CorruptBlobError:
        """``actual_sha256`` is empty when nothing was hashed (the size alone tells)."""
        if self._verified is not None:
            self._verified.forget(self._sha256)
        return CorruptBlobError(
            self._sha256,
            actual_sha256,
            self.position if found is None else found,
            expected_size=self._size,
            file=self.file,
        )


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
        """fsync, then rename into place; if the digest is already stored and sound, keep
        that copy (a corrupt one is replaced, and kept under ``corrupt/``). Either way
        the copy kept is sound, so any corruption record of the digest goes."""
        if self.committed is not None:
            return self.committed
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self.sha256
        final = self._store.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        created = not final.exists()
        # The same bytes stored again are the repair of a held copy that rotted: reading
        # the held copy costs less than receiving these did.
        try:
            repaired = not created and sha256_file(final) != digest
        except FileNotFoundError:  # deleted meanwhile (an undone commit): store these
            created, repaired = True, False
        if created or repaired:
            os.chmod(self.path, 0o444)
            if repaired:
                self._store.keep_as_evidence(digest)
            os.replace(self.path, final)
            fsync_dir(final.parent)
        else:
            self.path.unlink(missing_ok=True)
        # Also when the held copy hashed sound: a record left by a download that read a
        # copy replaced since (or by an earlier version) must not refuse it for good.
        self._store.clear_corrupt(digest)
        with contextlib.suppress(FileNotFoundError):
            self._store.verified.note(digest, self.size, FileIdentity.of(final))
        self.committed = BlobRef(digest, self.size, created, repaired)
        return self.committed


class BlobStore:
    def __init__(self, root: Path, *, verified_ttl_seconds: float = VERIFIED_TTL_SECONDS) -> None:
        self.root = root
        self.verified = RecentlyVerified(verified_ttl_seconds)  # see the module docstring
        self._objects = root / "sha256"
        self._tmp = root / "tmp"
        self.corrupt_dir = root / "corrupt"  # records of corrupt blobs, and replaced copies
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

    def open_verified(self, sha256: str, size: int) -> VerifiedReader:
        """Open a blob to hand on its first ``size`` bytes, checked (see VerifiedReader)."""
        return VerifiedReader(self.open(sha256), sha256, size, self.verified)

    def verify(self, sha256: str, size: int | None = None) -> None:
        """Hash the blob (its first ``size`` bytes, as a reader would hand them on) unless
        the same file was found sound lately; CorruptBlobError if they do not hash to its
        name, FileNotFoundError if absent."""
        if size is None:
            size = self.size(sha256)
        with self.open_verified(sha256, size) as reader:
            reader.skip_to(size)

    # ---------------------------------------------------------------- corruption
    def _corrupt_record(self, sha256: str) -> Path:
        return self.corrupt_dir / f"{check_sha256(sha256)}.json"

    def mark_corrupt(self, error: CorruptBlobError) -> bool:
        """Record that a blob was found corrupt; True unless it was recorded already.

        The record names the file that was read (``error.file``), so ``known_corrupt`` can
        refuse it at once for as long as nobody replaces it. When the blob's path holds
        another file by now (the same bytes were stored again while a slow download read
        the old one), there is nothing to refuse: nothing is recorded, and False. The
        blob itself stays where it is: rows name it, and it is the evidence.
        """
        self.verified.forget(error.sha256)
        record = self._corrupt_record(error.sha256)
        new = not record.exists()
        try:
            now = FileIdentity.of(self.path_for(error.sha256))
        except FileNotFoundError:
            return False  # gone meanwhile: a fetch says "missing" from now on
        if error.file is not None and error.file != now:
            log.info(
                "blob %s: the file found corrupt was replaced meanwhile; not recorded",
                error.sha256,
            )
            return False
        identity = asdict(now)
        body = {
            "sha256": error.sha256,
            "actual_sha256": error.actual_sha256,
            "size_found": error.size,
            "size_expected": error.expected_size,
            "found_unix_ms": int(time.time() * 1000),
            "file": identity,
        }
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record, (json.dumps(body) + "\n").encode())
        return new

    def known_corrupt(self, sha256: str, size: int | None = None) -> CorruptBlobError | None:
        """The corruption recorded for this blob, if its file is still the one found corrupt.

        A file that changed since (replaced by hand, say) is hashed again (its first
        ``size`` bytes, as a reader would hand them on; all of it by default): the record
        goes if it is sound now, and is renewed if not. Cheap when nothing is recorded.
        """
        record = self._corrupt_record(sha256)
        try:
            raw = json.loads(record.read_bytes())
            found = FileIdentity(**raw["file"])
            expected = raw.get("size_expected")
            error = CorruptBlobError(
                sha256,
                str(raw["actual_sha256"]),
                int(raw["size_found"]),
                expected_size=None if expected is None else int(expected),
                file=found,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable corruption record %s: %s", record, exc)
            return None
        try:
            if FileIdentity.of(self.path_for(sha256)) == found:
                return error
            self.verify(sha256, size)
        except FileNotFoundError:
            record.unlink(missing_ok=True)
            return None
        except CorruptBlobError as still:
            self.mark_corrupt(still)
            return still
        log.info("blob %s was recorded corrupt; its file changed and is sound now", sha256)
        record.unlink(missing_ok=True)
        return None

    def clear_corrupt(self, sha256: str) -> None:
        self._corrupt_record(sha256).unlink(missing_ok=True)

    def keep_as_evidence(self, sha256: str) -> Path | None:
        """Keep a corrupt blob's file under ``corrupt/`` before sound bytes replace it.

        A second name (a hard link; a copy where links are refused), so the blob's own
        path never goes missing for a reader while the replacement is renamed over it.
        One copy per digest is kept: this one replaces any earlier repair's (removed once
        this one is in place, and logged), so a disk that keeps rotting the same blob
        cannot fill the volume with full copies of it.
        """
        source = self.path_for(sha256)
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        found_ms = int(time.time() * 1000)
        while (kept := self.corrupt_dir / f"{sha256}.{found_ms}.blob").exists():
            found_ms += 1  # an earlier repair within this millisecond: this one is newer
        try:
            os.link(source, kept)
        except FileNotFoundError:
            return None
        except OSError:  # a file system without hard links
            shutil.copyfile(source, kept)
        self._drop_older_evidence(sha256, found_ms)
        log.warning(
            "blob %s was corrupt; the same bytes were stored again and replace it. The "
            "corrupt copy is kept at %s: compare it, check the disk, then delete it",
            sha256,
            kept,
        )
        return kept

    def evidence(self, sha256: str) -> list[Path]:
        """The corrupt copies of a blob kept under ``corrupt/`` (at most one, but for two
        replicas repairing it in the same moment)."""
        return sorted(self.corrupt_dir.glob(f"{check_sha256(sha256)}.*.blob"))

    def _drop_older_evidence(self, sha256: str, newest_ms: int) -> None:
        """Remove the copies kept by earlier repairs of ``sha256``; one kept since by
        another replica (a later time in its name) stays."""
        for older in self.evidence(sha256):
            try:
                kept_ms = int(older.name.split(".")[1])
            except (IndexError, ValueError):
                continue  # not a name this store gives: someone else's file
            if kept_ms >= newest_ms:
                continue
            with contextlib.suppress(FileNotFoundError):
                older.unlink()
                log.warning(
                    "blob %s: removed the corrupt copy an earlier repair kept (%s); the one "
                    "from this repair replaces it (one copy per digest is kept)",
                    sha256,
                    older,
                )

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
