"""Delta payloads between artifacts: computed once per (base, target), kept in the blob store.

A device says which artifact it holds (any blob the controller still has: an earlier
artifact, the FP32 model); the controller encodes the target against it with the
model-aware codec (artifact.delta) the first time anyone asks, stores the payload as a
content-addressed blob, and records the choice in
``blobs/deltas/v<format>/<base>/<target>.json`` (written atomically; the codec's format
version is part of the path, so an upgraded controller never serves a payload in a format
its agents no longer read). A delta that would not be smaller than the artifact is recorded
as "full", so it is not computed again either. Replicas sharing the blob volume share
the cache; two computing the same pair at once write identical bytes.

A cached payload is the controller's own work, not the operator's data, so a corrupt one
is never worth an error: taking a delta from the cache hashes its blob (a delta is small
beside its artifact, and reading it costs far less than sending it; a file found sound
within the trust window, ``verified_blob_trust_seconds``, is not hashed again), and a
corrupt one is dropped (blob and record) and computed again, in the same call, before
any byte of it is sent; the drop is reported (``on_dropped``) so the operator still
hears that the disk lost bytes. A payload that rots after that check is caught while it is streamed
(``BlobStore.open_verified``): the caller drops it (``drop``) and ends the fetch
FAILED_PRECONDITION, which an agent answers by starting over from byte 0 at once, and
gets a fresh one. Before encoding, the base and the target are hashed as well: a delta
made from corrupt bytes would rebuild corrupt bytes.

Computing a delta (hashing base and target, encoding, storing) runs on the ``encodes``
executor the cache is given (``AgentHandlers`` gives it a bounded pool of its own,
``delta_threads`` in the controller config), and checking a cached one on ``reads`` (the
blob-read pool downloads use): never on asyncio's default executor, which runs the
database calls every RPC waits for, and a resumed download of a cached delta never
waits behind another pair's encode.

The full artifact's payload is sized by the artifact's record (``full``), never by the
file: a blob cut short or lengthened is then read to the size it must have, and found
corrupt, rather than announced with a size its manifest contradicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from artifact.delta import write_delta
from artifact.delta.format import FORMAT_VERSION
from artifact.digest import check_sha256
from artifact.files import atomic_write_bytes
from controller.blobstore import BlobStore, CorruptBlobError
from controller.records import Encoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Payload:
    """What goes on the wire for one (base, target): its encoding, digest and size."""

    encoding: Encoding
    sha256: str  # the payload's own digest (the target's for FULL)
    size: int
    base_sha256: str = ""  # set for DELTA
    encode_seconds: float = 0.0


@dataclass(frozen=True)
class DroppedDelta:
    """A cached delta payload found corrupt and removed from the cache."""

    base_sha256: str
    target_sha256: str
    error: CorruptBlobError


OnDropped = Callable[[DroppedDelta], None]
_T = TypeVar("_T")


class DeltaCache:
    def __init__(self, blobs: BlobStore, *, encodes: Executor, reads: Executor) -> None:
        self._blobs = blobs
        self._encodes = encodes  # see the module docstring
        self._reads = reads
        self._index = blobs.root / "deltas" / f"v{FORMAT_VERSION}"
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _record_path(self, base: str, target: str) -> Path:
        return self._index / check_sha256(base) / f"{check_sha256(target)}.json"

    @staticmethod
    def full(target: str, size: int) -> Payload:
        """The artifact itself; ``size`` is its recorded size (the file may have lost bytes)."""
        return Payload(Encoding.FULL, target, size)

    def drop(self, base: str, target: str, payload_sha256: str) -> None:
        """Forget a cached delta (its record, then its blob): the next fetch computes it."""
        self._record_path(base, target).unlink(missing_ok=True)
        self._blobs.delete(payload_sha256)

    def _take(self, base: str, target: str) -> tuple[Payload | None, DroppedDelta | None]:
        """The cached payload, its delta blob checked; a corrupt one is dropped instead."""
        payload = self._cached(base, target)
        if payload is None or payload.encoding is not Encoding.DELTA:
            return payload, None  # a "full" record: the artifact is checked as it streams
        try:
            self._blobs.verify(payload.sha256, payload.size)
        except FileNotFoundError:
            return None, None
        except CorruptBlobError as exc:
            log.error(
                "cached delta %s -> %s is corrupt (%s); removing it and computing it again",
                base[:12],
                target[:12],
                exc,
            )
            self.drop(base, target, payload.sha256)
            return None, DroppedDelta(base, target, exc)
        return payload, None

    async def _take_reporting(
        self, base: str, target: str, on_dropped: OnDropped | None
    ) -> Payload | None:
        cached, dropped = await self._run(self._reads, self._take, base, target)
        if dropped is not None and on_dropped is not None:
            on_dropped(dropped)
        return cached

    def _cached(self, base: str, target: str) -> Payload | None:
        try:
            raw = json.loads(self._record_path(base, target).read_bytes())
            payload = Payload(
                Encoding(raw["encoding"]),
                check_sha256(raw["sha256"]),
                int(raw["size"]),
                base if raw["encoding"] == Encoding.DELTA.value else "",
                float(raw.get("encode_seconds", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable delta record %s/%s: %s", base, target, exc)
            return None
        if not self._blobs.exists(payload.sha256):
            return None  # the payload blob went away: compute it again
        return payload

    async def payload(self, base: str, target: str, on_dropped: OnDropped | None = None) -> Payload:
        """The payload for a device holding ``base`` that wants ``target`` (base known).

        A corrupt cached delta is computed again instead, and handed to ``on_dropped``
        (on the event loop); CorruptBlobError when the base or the target itself is
        corrupt, as nothing is encoded from them (see the module docstring).
        """
        cached = await self._take_reporting(base, target, on_dropped)
        if cached is not None:
            return cached
        lock = self._locks.setdefault((base, target), asyncio.Lock())
        async with lock:
            cached = await self._take_reporting(base, target, on_dropped)
            if cached is None:
                cached = await self._run(self._encodes, self._compute, base, target)
            return cached

    @staticmethod
    async def _run(executor: Executor, fn: Callable[[str, str], _T], base: str, target: str) -> _T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, base, target)

    def _compute(self, base: str, target: str) -> Payload:
        for sha in (base, target):  # raises CorruptBlobError: no delta of rotten bytes
            self._blobs.verify(sha)
        started = time.perf_counter()
        tmp_dir = self._blobs.root / "tmp"
        with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="delta-") as work:
            patch = Path(work) / "patch"
            write_delta(self._blobs.path_for(base), self._blobs.path_for(target), patch)
            seconds = time.perf_counter() - started
            target_size = self._blobs.size(target)
            if patch.stat().st_size < target_size:
                with patch.open("rb") as f:
                    ref = self._blobs.put(iter(lambda: f.read(1 << 20), b""))
                payload = Payload(Encoding.DELTA, ref.sha256, ref.size, base, seconds)
            else:
                payload = Payload(Encoding.FULL, target, target_size, "", seconds)
        record = {
            "encoding": payload.encoding.value,
            "sha256": payload.sha256,
            "size": payload.size,
            "target_size": target_size,
            "encode_seconds": round(seconds, 3),
        }
        path = self._record_path(base, target)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(record) + "\n").encode())
        log.info(
            "delta %s -> %s: %s, %d bytes for a %d-byte artifact (%.2f s)",
            base[:12],
            target[:12],
            payload.encoding.value,
            payload.size,
            target_size,
            seconds,
        )
        return payload
