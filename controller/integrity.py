"""Building from stored blobs only when their bytes are sound, and saying so when they are not.

The download path checks what it sends (``agents.py``); this module serves the readers
that build something from a stored blob: an artifact made from a model, a compression
job's inputs (the model, the class's previous int8 artifact), the calibration data the
budget loop recompresses with. Each checks the blob's digest before it is used. A corrupt
blob is recorded with the blob store (``mark_corrupt``: downloads refuse it at once too),
one ``blob.corrupt`` event says so with the detail fields a download's has, and the work
is refused with DATA_LOSS naming the model or artifact and the fix.

Storing the same bytes again repairs a blob (``StagedBlob.commit`` returns
``repaired=True``); ``BlobIntegrity.repaired`` records a ``blob.repaired`` event, so the
corruption is not the last word an operator reads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.blobstore import BlobStore, CorruptBlobError
from controller.errors import ErrorCode, FleetError
from controller.records import ArtifactRecord, ModelRecord, NewEvent
from controller.store import Store

log = logging.getLogger(__name__)

# Stored bytes that no longer hash to their digest: one event when a builder here or a
# download (agents.AgentHandlers._fetch) finds a blob corrupt, none for each refusal after.
CORRUPT_EVENT = "blob.corrupt"
REPAIRED_EVENT = "blob.repaired"
CHECK_DISK = (
    "check the controller's disk: it lost bytes (bit rot, a failing disk, or a file "
    "edited under the blob store)"
)
KEPT = "the corrupt copy is kept under blobs/corrupt/ (compare it, check the disk, then delete it)"
READ_BLOCK = 1 << 20


class BlobRole(enum.Enum):
    """What a stored blob is to an operator (the ``blob`` field of the events)."""

    MODEL = "model"
    ARTIFACT = "artifact"
    CALIBRATION = "calibration"


@dataclass(frozen=True)
class StoredBlob:
    """A stored blob something is built from, and how to name it and its fix to an operator."""

    sha256: str
    size: int | None  # the bytes the record names (None: the file's size)
    role: BlobRole
    label: str  # "model clf v1", "artifact clf/home-hub/v2", ...
    subject: str  # the events' subject: a model's name, an artifact's id
    fix: str  # what replaces the bytes
    model_name: str = ""
    model_version: int = 0
    artifact_id: str = ""

    @classmethod
    def of_model(cls, model: ModelRecord) -> StoredBlob:
        return cls(
            model.sha256,
            model.size_bytes,
            BlobRole.MODEL,
            f"model {model.name} v{model.version}",
            model.name,
            f"add the model's file again (`homefleet model add {model.name} FILE`: the "
            "same bytes replace the corrupt copy, which is kept under blobs/corrupt/)",
            model_name=model.name,
            model_version=model.version,
        )

    @classmethod
    def of_artifact(cls, artifact: ArtifactRecord, fix: str) -> StoredBlob:
        return cls(
            artifact.sha256,
            artifact.size_bytes,
            BlobRole.ARTIFACT,
            f"artifact {artifact.id}",
            artifact.id,
            fix,
            model_name=artifact.model_name,
            model_version=artifact.model_version,
            artifact_id=artifact.id,
        )

    @classmethod
    def of_calibration(
        cls, sha256: str, model_name: str, device_class: str, job_id: int | None = None
    ) -> StoredBlob:
        kept_by = f"kept by compression job {job_id} " if job_id is not None else ""
        return cls(
            sha256,
            None,
            BlobRole.CALIBRATION,
            f"the calibration data of model {model_name} ({kept_by}for {device_class})",
            model_name,
            f"compress {model_name} for {device_class} with its calibration file once "
            f"(`homefleet compress --controller ADDRESS --model {model_name} --calib "
            "FILE.npz --device-class CLASS.yaml`): the controller keeps that data for the "
            "budget loop, and the same bytes replace the corrupt copy",
            model_name=model_name,
        )


class BlobIntegrity:
    """Checks, copies and streams stored blobs for builders; reports corruption and repairs."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self._store = store
        self._blobs = blobs

    # ---------------------------------------------------------------- checking
    async def require_sound(self, blob: StoredBlob, doing: str, consequence: str) -> None:
        """Hash the whole blob; DATA_LOSS (recorded once) when corrupt. ``doing`` is what
        found it ("creating an artifact"), ``consequence`` what is refused ("no artifact
        of it is made"). FileNotFoundError when the blob is absent."""
        error = await asyncio.to_thread(self._check, blob)
        if error is not None:
            raise await self.refusal(blob, error, doing, consequence)

    def _check(self, blob: StoredBlob) -> CorruptBlobError | None:
        known = self._blobs.known_corrupt(blob.sha256)
        if known is not None:  # recorded, and the file is unchanged: no need to hash it
            return known
        size = blob.size if blob.size is not None else self._blobs.size(blob.sha256)
        try:
            # Every byte, read: what is built here is signed for good, so the store's
            # trust in a file it hashed lately (which saves resumed downloads a re-hash)
            # does not count; bit rot in place changes no file identity.
            with self._blobs.open_verified(blob.sha256, size) as reader:
                while reader.read(READ_BLOCK):
                    pass
        except CorruptBlobError as exc:
            return exc
        return None

    def copy_checked(self, blob: StoredBlob, target: Path) -> CorruptBlobError | None:
        """Copy the blob to ``target``, hashing every byte copied (new bytes are built from
        the copy, so no earlier check is trusted); on corruption return it and leave no
        ``target``. FileNotFoundError when the blob is absent (blocking)."""
        known = self._blobs.known_corrupt(blob.sha256)
        if known is not None:
            return known
        size = blob.size if blob.size is not None else self._blobs.size(blob.sha256)
        try:
            with self._blobs.open_verified(blob.sha256, size) as reader, target.open("wb") as out:
                while data := reader.read(READ_BLOCK):
                    out.write(data)
        except CorruptBlobError as exc:
            target.unlink(missing_ok=True)
            return exc
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return None

    async def copy_sound(
        self, blob: StoredBlob, target: Path, doing: str, consequence: str
    ) -> None:
        """Copy the blob to ``target``, checked; DATA_LOSS (recorded once) when corrupt."""
        error = await asyncio.to_thread(self.copy_checked, blob, target)
        if error is not None:
            raise await self.refusal(blob, error, doing, consequence)

    async def chunks(self, blob: StoredBlob, doing: str, consequence: str) -> AsyncIterator[bytes]:
        """The blob's bytes, hashed as they are read: the read that reaches the end checks
        the digest, so a corrupt blob's last bytes are never handed on (DATA_LOSS instead)."""
        size = blob.size
        if size is None:
            size = await asyncio.to_thread(self._blobs.size, blob.sha256)
        try:
            reader = await asyncio.to_thread(self._blobs.open_verified, blob.sha256, size)
        except CorruptBlobError as exc:  # a file of another size is refused on opening
            raise await self.refusal(blob, exc, doing, consequence) from exc
        with reader:
            while True:
                try:  # read() hashes from byte 0 whatever the store verified lately
                    data = await asyncio.to_thread(reader.read, READ_BLOCK)
                except CorruptBlobError as exc:
                    raise await self.refusal(blob, exc, doing, consequence) from exc
                if not data:
                    return
                yield data

    # ---------------------------------------------------------------- reporting
    async def refusal(
        self, blob: StoredBlob, error: CorruptBlobError, doing: str, consequence: str
    ) -> FleetError:
        """Record the corruption (once) and return the DATA_LOSS refusal to raise."""
        message = await self.found_corrupt(blob, error, doing, consequence)
        return FleetError(ErrorCode.DATA_LOSS, message)

    async def found_corrupt(
        self, blob: StoredBlob, error: CorruptBlobError, doing: str, consequence: str
    ) -> str:
        """Mark the blob corrupt (so downloads refuse it too); the first time, record one
        ``blob.corrupt`` event. Returns the message naming the blob and the fix."""
        message = (
            f"{blob.label}: its stored bytes are corrupt on the controller "
            f"(sha256 mismatch: the {error.size} bytes of blob {error.sha256} hash to "
            f"{error.actual_sha256}), so {consequence}. The controller refuses these bytes "
            f"(downloads too) until they are replaced: {blob.fix}; and {CHECK_DISK}"
        )
        if await asyncio.to_thread(self._blobs.mark_corrupt, error):
            detail = _blob_detail(blob)
            detail.update(
                expected_sha256=error.sha256,
                actual_sha256=error.actual_sha256,
                bytes_found=error.size,
                # a download's fields (agents.py); no device asked for these bytes
                target_sha256="",
                base_sha256="",
                device_id="",
                offset=0,
                found_while=doing,
                action="refused until the blob is replaced",
            )
            await self._event(NewEvent(CORRUPT_EVENT, blob.subject, message, detail))
        return message

    async def repaired(self, blob: StoredBlob, by: str) -> None:
        """The same bytes were stored again over a corrupt copy: say so in an event and
        the log (the ``blob.corrupt`` event would otherwise be the last word), and record
        the repair time, which assignments of these bytes carry from now on. A model's
        bytes may be an artifact's too (an identity artifact): the event names one, as
        a download's ``blob.corrupt`` event names the artifact."""
        artifact_id = blob.artifact_id
        if not artifact_id:
            try:
                shared = await asyncio.to_thread(self._store.find_artifact_by_sha256, blob.sha256)
            except Exception:  # naming it is a courtesy; the repair is done
                log.exception("could not look up artifacts of blob %s", blob.sha256)
                shared = None
            artifact_id = shared.id if shared is not None else ""
        also = (
            f" (also the bytes of artifact {artifact_id})"
            if artifact_id != blob.artifact_id
            else ""
        )
        message = (
            f"{blob.label}{also}: its stored bytes (sha256 {blob.sha256}) were corrupt on the "
            f"controller; {by} stored the same bytes again, which replace them, so they can "
            f"be downloaded and built from again; {KEPT}"
        )
        log.warning("%s", message)
        detail = _blob_detail(blob)
        detail.update(artifact_id=artifact_id, sha256=blob.sha256, repaired_by=by)
        event = NewEvent(REPAIRED_EVENT, blob.subject, message, detail)
        try:
            await asyncio.to_thread(self._store.record_blob_repair, blob.sha256, event)
        except Exception:  # the repair is done; agents then find it at their next retry
            log.exception("could not record the repair of blob %s", blob.sha256)

    async def _event(self, event: NewEvent) -> None:
        """Record an event; a database hiccup must not turn the answer into INTERNAL."""
        try:
            await asyncio.to_thread(self._store.add_event, event)
        except Exception:
            log.exception("could not record %s event: %s", event.kind, event.message)


def _blob_detail(blob: StoredBlob) -> dict[str, Any]:
    return {
        "artifact_id": blob.artifact_id,
        "blob": blob.role.value,
        "model_name": blob.model_name,
        "model_version": blob.model_version,
        "size_bytes": blob.size,
    }
