"""The agent's state on disk: verified artifacts, resumable downloads, and the slot table.

Layout under the state directory:
    artifacts/<sha256>.onnx   artifacts whose bytes matched their digest
    partial/<sha256>.part     downloads in progress; they survive restarts and resume
    slots.json                per model: the active artifact (with its signed manifest)
                              and the previous one; replaced atomically
    agent.json                where the local API listens (written once it listens)
    agent.lock                held while an agent runs, so two never share a directory

Only digests that passed check_sha256 ever become file names. A state directory that
cannot be written when the agent starts (read-only, no permission) is a configuration
error that names the directory, not a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from artifact.digest import check_sha256, sha256_file
from artifact.files import atomic_write_bytes, fsync_dir
from artifact.manifest import InvalidManifestError, Manifest
from artifact.names import check_name
from edge_agent.errors import AgentError, ErrorCode, describe_os_error
from protos import fleet_pb2

log = logging.getLogger(__name__)

SLOTS_SCHEMA_VERSION = 1


class SlotRecord(BaseModel):
    """One artifact held for a model: its digest and the signed manifest it came with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    manifest_json: str = ""
    signature_b64: str = ""
    key_id: str = ""
    activated_unix_ms: int = 0

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_sha256(value)

    @classmethod
    def from_signed(cls, sha256: str, signed: fleet_pb2.SignedManifest) -> SlotRecord:
        return cls(
            sha256=sha256,
            manifest_json=signed.manifest_json.decode("utf-8", errors="replace"),
            signature_b64=base64.b64encode(signed.signature).decode("ascii"),
            key_id=signed.key_id,
        )

    def to_signed(self) -> fleet_pb2.SignedManifest:
        return fleet_pb2.SignedManifest(
            manifest_json=self.manifest_json.encode("utf-8"),
            signature=base64.b64decode(self.signature_b64),
            key_id=self.key_id,
        )

    def activated_now(self) -> SlotRecord:
        return self.model_copy(update={"activated_unix_ms": int(time.time() * 1000)})

    def manifest(self) -> Manifest | None:
        """The manifest it was activated with (None: none kept, or unreadable)."""
        if not self.manifest_json:
            return None
        try:
            return Manifest.from_json_bytes(self.manifest_json.encode("utf-8"))
        except InvalidManifestError:
            return None


class ModelSlots(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    active: SlotRecord | None = None
    previous: SlotRecord | None = None
    # Per device class, the highest manifest version this device has activated: a lower
    # one is refused (a replayed old manifest is a rollback attack; the controller rolls
    # back by re-releasing older bytes under a new version).
    version_floor: dict[str, int] = Field(default_factory=dict)
    # Per device class, the artifact the floor version was first accepted with: the same
    # version naming other bytes is a reused version (refused), the same bytes again (an
    # artifact lost on disk and fetched anew) are not. Files written before it lack it.
    floor_sha256: dict[str, str] = Field(default_factory=dict)

    @field_validator("floor_sha256")
    @classmethod
    def _floor_digests(cls, value: dict[str, str]) -> dict[str, str]:
        return {device_class: check_sha256(sha) for device_class, sha in value.items()}

    def floor_artifacts(self) -> dict[str, str]:
        """``floor_sha256``, completed from the slots' own manifests for an older file."""
        found = dict(self.floor_sha256)
        for record in (self.active, self.previous):
            manifest = record.manifest() if record is not None else None
            if (
                record is not None
                and manifest is not None
                and manifest.device_class not in found
                and self.version_floor.get(manifest.device_class) == manifest.version
            ):
                found[manifest.device_class] = record.sha256
        return found


class SlotsFile(BaseModel):
    """The whole slot table, as persisted in slots.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SLOTS_SCHEMA_VERSION
    models: dict[str, ModelSlots] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSlots]) -> dict[str, ModelSlots]:
        for name in value:
            check_name(name, field="model name")
        return value

    def referenced(self) -> set[str]:
        """Every digest a slot points at: the artifacts that must stay on disk."""
        out: set[str] = set()
        for slots in self.models.values():
            out.update(r.sha256 for r in (slots.active, slots.previous) if r is not None)
        return out


# errnos that say the directory is not the agent's to write: fixing it takes a person
# (ENOENT although parents are made: a path on /proc or a like file system)
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}


def unwritable(root: Path, exc: OSError) -> AgentError:
    """The state directory refused a write at start: a configuration error when only a
    person can fix it (exit 2), else one that may pass (a full disk: exit 1)."""
    if exc.errno == errno.EROFS:
        fix = "mount it read-write, or choose another --state-dir"
    elif exc.errno == errno.ENOENT:
        fix = "this file system makes no directories there: choose another --state-dir"
    elif exc.errno in _NOT_WRITABLE:
        fix = "give the agent's user write access to it, or choose another --state-dir"
    else:
        fix = "free space or repair its file system, then start the agent again"
    return AgentError(
        ErrorCode.INVALID_CONFIG if exc.errno in _NOT_WRITABLE else ErrorCode.STORAGE_FAILED,
        f"--state-dir: the agent cannot write to {root} ({describe_os_error(exc)}): {fix}",
    )


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.artifacts_dir = root / "artifacts"
        self.partial_dir = root / "partial"
        self.slots_path = root / "slots.json"
        # The same table, written just before slots.json at every save: the version floors
        # (and what is served) survive a slots.json that rots or is damaged (QA: a corrupt
        # slots.json reset the floors, and an older manifest was accepted).
        self.slots_backup_path = root / "slots.backup.json"
        self.agent_info_path = root / "agent.json"
        self.lock_path = root / "agent.lock"
        try:
            for directory in (self.root, self.artifacts_dir, self.partial_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(root, exc) from None

    # -- exclusive use ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold agent.lock for the life of the agent; a second agent is refused at once."""
        try:
            handle: IO[bytes] = self.lock_path.open("a+b")
        except OSError as exc:
            raise unwritable(self.root, exc) from None
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AgentError(
                    ErrorCode.STATE_LOCKED,
                    f"another agent is running with state directory {self.root}; "
                    "stop it or give this one its own --state-dir",
                ) from None
            yield
        finally:
            handle.close()

    # -- artifacts --------------------------------------------------------------------

    def artifact_path(self, sha256: str) -> Path:
        return self.artifacts_dir / f"{check_sha256(sha256)}.onnx"

    def partial_path(self, sha256: str) -> Path:
        return self.partial_dir / f"{check_sha256(sha256)}.part"

    def has_artifact(self, sha256: str) -> bool:
        return self.artifact_path(sha256).is_file()

    def verify_artifact(self, sha256: str) -> bool:
        """True when the artifact file exists and its bytes still hash to ``sha256``."""
        path = self.artifact_path(sha256)
        if not path.is_file():
            return False
        actual = sha256_file(path)
        if actual != sha256:
            log.error("artifact %s is corrupt on disk (its bytes hash to %s)", sha256, actual)
            return False
        return True

    def partial_size(self, sha256: str) -> int:
        try:
            return self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def discard_partial(self, sha256: str) -> None:
        self.partial_path(sha256).unlink(missing_ok=True)

    def promote_partial(self, sha256: str) -> Path:
        """Move a finished download into artifacts/ only if its bytes hash to ``sha256``.

        A mismatch deletes the part file (resuming it would only repeat the mismatch).
        """
        part = self.partial_path(sha256)
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise AgentError(
                ErrorCode.HASH_MISMATCH, f"sha256 mismatch: expected {sha256} got {actual}"
            )
        target = self.artifact_path(sha256)
        os.replace(part, target)
        fsync_dir(self.artifacts_dir)
        fsync_dir(self.partial_dir)
        return target

    def delta_partial_path(self, sha256: str) -> Path:
        """A delta payload being downloaded for artifact ``sha256``."""
        return self.partial_dir / f"{check_sha256(sha256)}.delta"

    def delta_info_path(self, sha256: str) -> Path:
        """What that payload is (its digest, size and base), written before its first byte."""
        return self.partial_dir / f"{check_sha256(sha256)}.delta.json"

    def discard_delta_partial(self, sha256: str) -> None:
        self.delta_partial_path(sha256).unlink(missing_ok=True)
        self.delta_info_path(sha256).unlink(missing_ok=True)

    def discard_partials_except(self, keep: set[str]) -> list[str]:
        """Delete part files of downloads nobody wants any more; return their digests."""
        removed: set[str] = set()
        for path in self.partial_dir.iterdir():
            digest = path.name.split(".", 1)[0]
            if digest not in keep:
                path.unlink(missing_ok=True)
                removed.add(digest)
        return sorted(removed)

    def collect_garbage(self, keep: set[str]) -> list[str]:
        """Delete artifacts no slot references; return their digests."""
        removed: list[str] = []
        for path in self.artifacts_dir.glob("*.onnx"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.stem)
        return removed

    # -- slot table -------------------------------------------------------------------

    def load_slots(self) -> SlotsFile:
        """The slot table; an unreadable slots.json is moved aside for its backup copy when
        that one reads (STATE_CORRUPT, naming the problem, when neither does)."""
        try:
            return self._read_slots(self.slots_path)
        except AgentError as exc:
            try:
                backup = self._read_slots(self.slots_backup_path, missing_ok=False)
            except AgentError:
                raise exc from None
            aside = self.quarantine_slots()
            log.error("%s; moved it to %s and using %s, written with it at its last save",
                      exc.message, aside, self.slots_backup_path)  # fmt: skip
            return backup

    def _read_slots(self, path: Path, *, missing_ok: bool = True) -> SlotsFile:
        if missing_ok and not path.exists():
            return SlotsFile()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AgentError(ErrorCode.STATE_CORRUPT, f"{path} cannot be read: {exc}") from exc
        try:
            slots = SlotsFile.model_validate_json(raw)
        except ValidationError as exc:
            raise AgentError(
                ErrorCode.STATE_CORRUPT, f"{path} is not valid ({_problems(exc)})"
            ) from exc
        if slots.schema_version != SLOTS_SCHEMA_VERSION:
            raise AgentError(
                ErrorCode.STATE_CORRUPT,
                f"{path} has schema_version {slots.schema_version}; "
                f"this agent reads {SLOTS_SCHEMA_VERSION}",
            )
        return slots

    def quarantine_slots(self) -> Path:
        """Move an unreadable slots.json aside (kept for a person to look at)."""
        aside = self.slots_path.with_name(f"slots.json.corrupt-{int(time.time())}")
        os.replace(self.slots_path, aside)
        return aside

    def save_slots(self, slots: SlotsFile) -> None:
        data = json.dumps(slots.model_dump(mode="json"), indent=2, sort_keys=True).encode()
        atomic_write_bytes(self.slots_backup_path, data + b"\n")
        atomic_write_bytes(self.slots_path, data + b"\n")

    # -- agent.json -------------------------------------------------------------------

    def write_agent_info(self, local_api: str, device_id: str) -> None:
        info = {"local_api": local_api, "pid": os.getpid(), "device_id": device_id}
        atomic_write_bytes(self.agent_info_path, json.dumps(info, sort_keys=True).encode() + b"\n")

    def remove_agent_info(self) -> None:
        self.agent_info_path.unlink(missing_ok=True)


def _problems(exc: ValidationError) -> str:
    """pydantic's errors in one line: where and what, without its input dump and links."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
