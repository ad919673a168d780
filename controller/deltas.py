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
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from artifact.delta import write_delta
from artifact.delta.format import FORMAT_VERSION
from artifact.digest import check_sha256
from artifact.files import atomic_write_bytes
from controller.blobstore import BlobStore
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


class DeltaCache:
    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._index = blobs.root / "deltas" / f"v{FORMAT_VERSION}"
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _record_path(self, base: str, target: str) -> Path:
        return self._index / check_sha256(base) / f"{check_sha256(target)}.json"

    def full(self, target: str) -> Payload:
        return Payload(Encoding.FULL, target, self._blobs.size(target))

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

    async def payload(self, base: str, target: str) -> Payload:
        """The payload for a device holding ``base`` that wants ``target`` (base known)."""
        cached = self._cached(base, target)
        if cached is not None:
            return cached
        lock = self._locks.setdefault((base, target), asyncio.Lock())
        async with lock:
            cached = self._cached(base, target)
            if cached is None:
                cached = await asyncio.to_thread(self._compute, base, target)
            return cached

    def _compute(self, base: str, target: str) -> Payload:
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
