"""Operator actions, free of gRPC: add models, build and sign artifacts, assign them, list things.

Every method checks its input first and changes nothing when it refuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

from artifact.manifest import Manifest, RecipeStep, TensorSpec, artifact_id, utc_now
from artifact.signing import SigningKey
from controller import validate
from controller.blobstore import BlobRef, BlobSizeError, BlobStore
from controller.clock import unix_ms
from controller.config import ControllerConfig
from controller.errors import ErrorCode, FleetError, invalid, not_found
from controller.fleet_classes import DeviceClassRegistry
from controller.integrity import BlobIntegrity, StoredBlob
from controller.notify import AssignmentNotifier
from controller.onnx_inspect import inspect_onnx
from controller.paging import PageToken, cut_page, within_bytes
from controller.records import (
    ArtifactRecord,
    ArtifactRequest,
    AssignResult,
    AssignTarget,
    DeviceView,
    EventRecord,
    ModelRecord,
    ModelUpload,
    NewModel,
    RemovedDevice,
    TargetKind,
)
from controller.store import (
    MAX_ARTIFACT_PAGE,
    MAX_DEVICE_PAGE,
    MAX_MODEL_PAGE,
    Store,
    VersionConflictError,
)

log = logging.getLogger(__name__)

# (model, device class, sha256 of a compression's bytes) -> an earlier artifact to use
# instead of publishing them as a new version, or None (``add_publish_check``)
PublishCheck = Callable[[str, str, str], Awaitable["ArtifactRecord | None"]]


@dataclass(frozen=True)
class AddedModel:
    """What AddModel did: the version, whether it is new (False: these bytes already
    were the latest), how its interface differs from the version before ("" same), and
    whether these bytes replaced a corrupt stored copy (Model.repaired, and a
    ``blob.repaired`` event)."""

    record: ModelRecord
    created: bool
    interface_change: str
    repaired: bool = False


def _specs(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(
        f"{s.name} {s.dtype}[{','.join('?' if d < 0 else str(d) for d in s.shape)}]" for s in specs
    )


def interface_change(previous: ModelRecord, new: ModelRecord) -> str:
    """Why applications calling the previous version would break on the new one, if so."""
    changes = [
        f"{what} {_specs(old) or '-'} -> {_specs(now) or '-'}"
        for what, old, now in (
            ("inputs", previous.inputs, new.inputs),
            ("outputs", previous.outputs, new.outputs),
        )
        if tuple(old) != tuple(now)
    ]
    if not changes:
        return ""
    return (
        f"its interface differs from v{previous.version}'s ({'; '.join(changes)}): "
        "applications written for the earlier version will get INVALID_ARGUMENT from it"
    )


P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_EXPIRY_DAYS = 365
MAX_EXPIRY_DAYS = 3650
MAX_DESCRIPTION = 1024
MAX_ARTIFACT_ID = 200
DEFAULT_EVENT_LIMIT = 100
MAX_EVENT_LIMIT = 1000
MAX_KIND_PREFIX = 64
DEVICE_PAGE = 1000  # devices per ListDevices page when the client does not say
ARTIFACT_PAGE = 1000  # artifacts per ListArtifacts page when the client does not say
MODEL_PAGE = 1000  # model versions per ListModels page when the client does not say
ARTIFACT_RETRIES = 20
RETRY_PAUSE_S = 0.02  # upper bound of the jittered pause between lost races (other replicas)
COPY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EventPage:
    """Events oldest first, and whether more match beyond them (older ones when the
    newest were asked for, later ones otherwise)."""

    events: list[EventRecord]
    more: bool


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking store or file work off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def stored_model(
    store: Store, blobs: BlobStore, name: str, version: int | None
) -> ModelRecord:
    """A registered model whose bytes are in the blob store (latest when version is None)."""
    model = await in_thread(store.get_model, name, version)
    if model is None:
        which = f" version {version}" if version else ""
        raise not_found(
            f"model {name!r}{which} is not registered; add it first "
            "(AddModel / `homefleet model add`)"
        )
    if not await in_thread(blobs.exists, model.sha256):
        raise FleetError(
            ErrorCode.FAILED_PRECONDITION,
            f"the bytes of model {model.name} v{model.version} ({model.sha256}) are missing "
            "from the blob store; add the model again",
        )
    return model


@dataclass(frozen=True)
class ModelPage:
    """One ListModels page; ``next_page_token`` is "" on the last."""

    models: list[ModelRecord]
    next_page_token: str


@dataclass(frozen=True)
class ArtifactPage:
    """One ListArtifacts page; ``next_page_token`` is "" on the last."""

    artifacts: list[ArtifactRecord]
    next_page_token: str


@dataclass(frozen=True)
class DevicePage:
    """One ListDevices page; ``next_page_token`` is "" on the last."""

    devices: list[DeviceView]
    next_page_token: str


class AdminHandlers:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        key: SigningKey,
        config: ControllerConfig,
        notifier: AssignmentNotifier,
        classes: DeviceClassRegistry | None = None,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._integrity = BlobIntegrity(store, blobs)
        self._key = key
        self._config = config
        self._notifier = notifier
        self._classes = classes or DeviceClassRegistry()
        # Writers in this process take turns per (model, class); the unique constraint
        # and the retry below only have to settle races with other controller replicas.
        self._version_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._publish_checks: list[PublishCheck] = []

    def add_publish_check(self, check: PublishCheck) -> None:
        """Ask ``check`` before a compression job's bytes become a new artifact version:
        an artifact it returns is the job's result instead (the budget loop's: bytes it
        already judged for the pair are not published again)."""
        self._publish_checks.append(check)

    # ---------------------------------------------------------------- models
    def check_upload(self, upload: ModelUpload) -> ModelUpload:
        validate.name(upload.name, "name")
        validate.text(upload.description, "description", MAX_DESCRIPTION)
        validate.optional_digest(upload.sha256, "sha256")
        if upload.size_bytes <= 0:
            raise invalid("size_bytes must be the ONNX file's size in bytes (> 0), got 0")
        if upload.size_bytes > self._config.max_model_bytes:
            raise FleetError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model is {upload.size_bytes} bytes; this controller accepts at most "
                f"{self._config.max_model_bytes} bytes (max_model_bytes)",
            )
        return upload

    async def add_model(self, upload: ModelUpload, chunks: AsyncIterator[bytes]) -> AddedModel:
        """Stage the bytes, check size, digest and ONNX validity, then store blob and row."""
        self.check_upload(upload)
        with self._blobs.staging(limit=upload.size_bytes) as staged:
            async for data in chunks:
                try:
                    await in_thread(staged.write, data)
                except BlobSizeError as exc:
                    raise invalid(
                        f"received more than the {upload.size_bytes} bytes the header announced "
                        "(size_bytes); send exactly the file's size"
                    ) from exc
            if staged.size != upload.size_bytes:
                raise invalid(
                    f"received {staged.size} bytes but the header announced {upload.size_bytes} "
                    "(size_bytes); the upload was cut short or the size is wrong"
                )
            if upload.sha256 and staged.sha256 != upload.sha256:
                raise invalid(
                    f"the received bytes have sha256 {staged.sha256}, the header said "
                    f"{upload.sha256}; the file changed or was corrupted in transit"
                )
            await in_thread(staged.flush)
            info = await in_thread(inspect_onnx, staged.path)
            blob: BlobRef = await in_thread(staged.commit)
        new = NewModel(
            name=upload.name,
            sha256=blob.sha256,
            size_bytes=blob.size,
            inputs=info.inputs,
            outputs=info.outputs,
            description=upload.description,
        )
        try:
            async with self._version_locks.setdefault((new.name, ""), asyncio.Lock()):
                previous = await in_thread(self._store.get_model, new.name)
                record, created = await in_thread(self._store.add_model, new)
        except BaseException:
            if blob.created:
                self._blobs.delete(blob.sha256)
            raise
        log.info(
            "model %s v%d %s (%s)",
            record.name,
            record.version,
            "added" if created else "unchanged",
            record.sha256[:12],
        )
        if blob.repaired:  # the documented fix for a corrupt model: its file added again
            await self._repaired(
                StoredBlob.of_model(record), f"adding model {record.name}'s file (AddModel)"
            )
        change = interface_change(previous, record) if created and previous else ""
        if change:
            log.warning("model %s v%d: %s", record.name, record.version, change)
        return AddedModel(record, created, change, blob.repaired)

    async def _repaired(self, blob: StoredBlob, by: str) -> None:
        """Record the repair, and wake every watch stream: its assignments now carry the
        repair time, so agents whose download of these bytes failed retry at once."""
        await self._integrity.repaired(blob, by)
        self._notifier.notify_all()

    async def list_models(self, page_size: int = 0, page_token: str = "") -> ModelPage:
        """One page of model versions in (name, version) order, and the next token."""
        size = validate.int_range(page_size, "page_size", 0, MAX_MODEL_PAGE) or MODEL_PAGE
        start = PageToken.decode(page_token, scope="", key=(str, int))
        after = (str(start.after[0]), int(start.after[1])) if start else None
        records = await in_thread(self._store.list_models, after=after, limit=size + 1)
        return ModelPage(*cut_page(records, size, "", lambda m: (m.name, m.version)))

    # ---------------------------------------------------------------- artifacts
    async def create_artifact(self, request: ArtifactRequest) -> ArtifactRecord:
        """Build the artifact (for now: the model's bytes as they are) and sign its manifest."""
        validate.name(request.model_name, "model_name")
        validate.name(request.device_class, "device_class")
        days = request.expires_in_days or DEFAULT_EXPIRY_DAYS
        validate.int_range(days, "expires_in_days", 1, MAX_EXPIRY_DAYS)
        if request.model_version is not None:
            validate.int_range(request.model_version, "model_version", 1, 2**31 - 1)
        model = await stored_model(
            self._store, self._blobs, request.model_name, request.model_version
        )
        # The artifact is the model's bytes: signing a digest the blob no longer has
        # would hand devices a manifest whose download can only fail.
        await self._integrity.require_sound(
            StoredBlob.of_model(model),
            "creating an artifact",
            f"no artifact of it is made for {request.device_class}",
        )
        return await self._insert_next_version(
            model.name,
            request.device_class,
            lambda version: self._build(model, request.device_class, version, days),
        )

    def size_warning(self, artifact: ArtifactRecord) -> str:
        """Why ``artifact`` may not suit its class ("" when it may, or when this
        controller declares no classes): CreateArtifact signs the model as it is,
        uncompressed, for whichever class an operator names (a typo included)."""
        device_class, size_bytes = artifact.device_class, artifact.size_bytes
        undeclared = self._undeclared(device_class)
        if undeclared:
            return (
                f"{undeclared}: a typo? Only devices registered with exactly this class "
                "can receive the artifact"
            )
        known = self._classes.get(device_class)
        if known is None:
            return ""
        fix = (
            f"`homefleet compress --controller ADDRESS --model {artifact.model_name} "
            f"--device-class FILE.yaml` with {device_class}'s class file makes one that fits"
        )
        if size_bytes > known.model_storage_bytes:
            return (
                f"{size_bytes:,} B is more than a {device_class} device can store "
                f"(model_storage_bytes {known.model_storage_bytes:,}, the class file's "
                f"figure): its devices may run out of space installing it; {fix}"
            )
        limit = known.budgets.max_artifact_bytes
        if limit is not None and size_bytes > limit:
            return (
                f"{size_bytes:,} B is over {device_class}'s max_artifact_bytes budget "
                f"({limit:,}); {fix}"
            )
        return ""

    async def assign_warning(self, target: AssignTarget) -> str:
        """Why an assignment to ``target`` may reach no device ("" when it may): a class
        that no device-class file declares and no registered device has is likely a
        typo, as CreateArtifact says of such a class. A warning, not a refusal: devices
        of a new class may register later."""
        if target.kind is not TargetKind.CLASS:
            return ""
        undeclared = self._undeclared(target.name)
        if not undeclared:
            return ""
        if await in_thread(self._store.list_devices, target.name, limit=1):
            return ""
        return (
            f"{undeclared}, and no registered device is of that class: a typo? The "
            "assignment reaches only devices that register with exactly this class"
        )

    def _undeclared(self, device_class: str) -> str:
        """Says that no device-class file declares ``device_class`` ("" when one does, or
        when this controller declares no classes at all)."""
        declared = self._classes.names()
        if not declared or self._classes.get(device_class) is not None:
            return ""
        return (
            f"no device-class file on this controller declares class {device_class!r} "
            f"(it has {', '.join(declared)})"
        )

    async def _insert_next_version(
        self, model_name: str, device_class: str, build: Callable[[int], ArtifactRecord]
    ) -> ArtifactRecord:
        """Insert ``build(next version)``, taking turns per (model, class) in this process."""
        lock = self._version_locks.setdefault((model_name, device_class), asyncio.Lock())
        async with lock:
            for _ in range(ARTIFACT_RETRIES):
                version = await in_thread(
                    self._store.next_artifact_version, model_name, device_class
                )
                record = build(version)
                try:
                    return await in_thread(self._store.insert_artifact, record)
                except VersionConflictError:
                    await asyncio.sleep(random.uniform(0, RETRY_PAUSE_S))
        raise FleetError(
            ErrorCode.UNAVAILABLE,
            f"could not allocate an artifact version for {model_name}/{device_class} "
            "after several concurrent attempts; retry",
        )

    def _build(
        self, model: ModelRecord, device_class: str, version: int, days: int
    ) -> ArtifactRecord:
        return self._sign(
            model,
            device_class,
            version,
            days,
            sha256=model.sha256,
            size_bytes=model.size_bytes,
            inputs=model.inputs,
            outputs=model.outputs,
            recipe=(RecipeStep(kind="identity"),),
            metrics={"size_bytes": float(model.size_bytes)},
        )

    def _sign(
        self,
        model: ModelRecord,
        device_class: str,
        version: int,
        days: int,
        *,
        sha256: str,
        size_bytes: int,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        recipe: tuple[RecipeStep, ...],
        metrics: dict[str, float],
    ) -> ArtifactRecord:
        created = utc_now()
        manifest = Manifest(
            model_name=model.name,
            model_version=model.version,
            device_class=device_class,
            version=version,
            sha256=sha256,
            size_bytes=size_bytes,
            inputs=inputs,
            outputs=outputs,
            recipe=recipe,
            metrics=metrics,
            created_at=created,
            expires_at=created + timedelta(days=days),
        )
        raw = manifest.to_json_bytes()
        return ArtifactRecord(
            id=artifact_id(model.name, device_class, version),
            model_name=model.name,
            model_version=model.version,
            device_class=device_class,
            version=version,
            sha256=sha256,
            size_bytes=size_bytes,
            manifest_json=raw,
            signature=self._key.sign(raw),
            key_id=self._key.key_id,
            created_unix_ms=int(created.timestamp() * 1000),
        )

    # ---------------------------------------------------------------- compression jobs
    async def register_source(self, name: str, path: Path, description: str) -> ModelRecord:
        """Register a model file the controller produced (a workload's FP32 source)."""
        validate.name(name, "name")
        info = await in_thread(inspect_onnx, path)
        blob = await in_thread(self._commit_file, path)
        new = NewModel(
            name=name,
            sha256=blob.sha256,
            size_bytes=blob.size,
            inputs=info.inputs,
            outputs=info.outputs,
            description=description[:MAX_DESCRIPTION],
        )
        try:
            async with self._version_locks.setdefault((name, ""), asyncio.Lock()):
                record, _ = await in_thread(self._store.add_model, new)
        except BaseException:
            if blob.created:
                self._blobs.delete(blob.sha256)
            raise
        if blob.repaired:
            await self._repaired(
                StoredBlob.of_model(record), f"registering workload {name}'s source model"
            )
        return record

    async def publish_compressed(
        self,
        model: ModelRecord,
        device_class: str,
        path: Path,
        recipe: tuple[RecipeStep, ...],
        metrics: dict[str, float],
    ) -> ArtifactRecord:
        """Store a compression job's model and sign its artifact: the job's recipe and
        metrics, the source model's name and version, the next version for the class.
        A publish check (``add_publish_check``) may hand back an earlier artifact with
        the same bytes instead: then no new version is made."""
        validate.name(device_class, "device_class")
        info = await in_thread(inspect_onnx, path)
        blob = await in_thread(self._commit_file, path)
        try:
            earlier = None
            for check in self._publish_checks:
                earlier = earlier or await check(model.name, device_class, blob.sha256)
            record = earlier or await self._insert_next_version(
                model.name,
                device_class,
                lambda version: self._sign(
                    model,
                    device_class,
                    version,
                    DEFAULT_EXPIRY_DAYS,
                    sha256=blob.sha256,
                    size_bytes=blob.size,
                    inputs=info.inputs,
                    outputs=info.outputs,
                    recipe=recipe,
                    metrics=metrics,
                ),
            )
        except BaseException:
            if blob.created:
                self._blobs.delete(blob.sha256)
            raise
        if blob.repaired:  # an earlier artifact (or model) with the very same bytes
            await self._repaired(
                StoredBlob.of_artifact(record, ""),
                f"compressing {model.name} (artifact {record.id})",
            )
        return record

    def _commit_file(self, path: Path) -> BlobRef:
        """Copy a local file into the blob store (blocking: run in a thread)."""
        with self._blobs.staging() as staged, path.open("rb") as source:
            while block := source.read(COPY_CHUNK_BYTES):
                staged.write(block)
            staged.flush()
            return staged.commit()

    async def list_artifacts(
        self, model_name: str, device_class: str, page_size: int = 0, page_token: str = ""
    ) -> ArtifactPage:
        """One page of artifacts in (model, class, version) order, and the next token."""
        model = validate.optional_name(model_name, "model_name")
        cls = validate.optional_name(device_class, "device_class")
        size = validate.int_range(page_size, "page_size", 0, MAX_ARTIFACT_PAGE) or ARTIFACT_PAGE
        scope = f"{model or '*'}/{cls or '*'}"
        start = PageToken.decode(page_token, scope=scope, key=(str, str, int))
        after = None
        if start is not None:
            after = (str(start.after[0]), str(start.after[1]), int(start.after[2]))
        records = await in_thread(
            self._store.list_artifacts, model, cls, after=after, limit=size + 1
        )
        return ArtifactPage(
            *cut_page(records, size, scope, lambda a: (a.model_name, a.device_class, a.version))
        )

    # ---------------------------------------------------------------- assignments
    async def assign(self, artifact_id_: str, target: AssignTarget | None) -> AssignResult:
        if not artifact_id_:
            raise invalid("artifact_id is required, e.g. 'motions/home-hub/v1'")
        validate.text(artifact_id_, "artifact_id", MAX_ARTIFACT_ID)
        if target is None:
            raise invalid("set a target: device_class or device_id")
        validate.name(
            target.name, "device_class" if target.kind is TargetKind.CLASS else "device_id"
        )
        artifact = await in_thread(self._store.get_artifact, artifact_id_)
        if artifact is None:
            raise not_found(
                f"artifact {artifact_id_!r} does not exist; create it first (CreateArtifact / "
                "`homefleet artifact create`) or list them (`homefleet artifact list`)"
            )
        if target.kind is TargetKind.CLASS:
            if artifact.device_class != target.name:
                raise FleetError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"artifact {artifact.id} was built for device class "
                    f"{artifact.device_class!r}, not {target.name!r}; create an artifact for "
                    f"{target.name!r} first",
                )
        else:
            device = await in_thread(self._store.get_device, target.name)
            if device is None:
                raise not_found(f"device {target.name!r} is not registered")
            if device.device_class != artifact.device_class:
                raise FleetError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"device {device.device_id} is of class {device.device_class!r} but artifact "
                    f"{artifact.id} was built for {artifact.device_class!r}; assign an artifact "
                    f"built for {device.device_class!r}",
                )
        asked = artifact
        artifact, made = await self._current_version_of(artifact)
        result = await in_thread(self._store.assign, artifact, target)
        if result.changed:
            self._notifier.notify(target)
        return dataclasses.replace(
            result,
            rereleased_from=asked.id if made else "",
            warning=await self.assign_warning(target),
        )

    async def unassign(self, model_name: str, device_id: str) -> AssignResult:
        """The device's own assignment of ``model_name`` goes: it follows its class again.

        When the class's artifact is older than a version in use (the device's own
        assignment, or what a device of the class serves), the class gets it re-released
        first, as `assign` does for a rollback: the agent refuses a manifest older than
        one it ran, and would stay where it is. The re-release is a new version for every
        device following the class, with the same bytes: those already serving them
        download nothing. The result's ``artifact_id`` names what the device follows.
        """
        validate.name(model_name, "model_name")
        validate.name(device_id, "device_id")
        device = await in_thread(self._store.get_device, device_id)
        if device is None:
            raise not_found(f"device {device_id!r} is not registered")
        if await in_thread(self._store.get_model, model_name) is None:
            raise not_found(
                f"model {model_name!r} is not registered on this controller; "
                "`homefleet model list` lists the models"
            )
        own = AssignTarget(TargetKind.DEVICE, device_id)
        if await in_thread(self._store.assigned, own, model_name) is None:
            raise not_found(
                f"device {device_id} has no assignment of its own for model {model_name!r}: "
                f"it already follows class {device.device_class}"
            )
        of_class = AssignTarget(TargetKind.CLASS, device.device_class)
        follows = await in_thread(self._store.assigned, of_class, model_name)
        rereleased_from = ""
        if follows is not None:
            current, _ = await self._current_version_of(follows)
            if current.id != follows.id:
                moved = await in_thread(self._store.assign, current, of_class)
                if moved.changed:
                    self._notifier.notify(of_class)
                rereleased_from = follows.id
        result = await in_thread(self._store.unassign, model_name, device_id)
        if result is None:
            raise not_found(
                f"device {device_id} has no assignment of its own for model {model_name!r}: "
                f"it already follows class {device.device_class}"
            )
        self._notifier.notify(AssignTarget(TargetKind.DEVICE, device_id))
        return dataclasses.replace(result, rereleased_from=rereleased_from)

    async def _current_version_of(self, artifact: ArtifactRecord) -> tuple[ArtifactRecord, bool]:
        """``artifact`` itself, or a re-release of it when a newer version is in use; and
        whether this call made that re-release.

        Agents refuse a manifest older than one they already ran (a replayed old manifest
        is a rollback attack), so going back to older bytes than a version assigned or
        served takes a new, higher version that names what it re-releases. Assigning an
        old version twice re-releases once.
        """
        key = (artifact.model_name, artifact.device_class)
        in_use = await in_thread(self._store.highest_version_in_use, *key)
        if artifact.version >= in_use:
            return artifact, False
        newest = await in_thread(self._store.next_artifact_version, *key) - 1
        latest = await in_thread(self._store.get_artifact, artifact_id(*key, newest))
        if latest is not None and latest.sha256 == artifact.sha256:
            return latest, False  # already re-released: the newest version holds these bytes
        old = Manifest.from_json_bytes(artifact.manifest_json)

        def rerelease(version: int) -> ArtifactRecord:
            created = utc_now()
            manifest = old.model_copy(
                update={
                    "version": version,
                    "created_at": created,
                    "expires_at": created + (old.expires_at - old.created_at),
                    "rereleases": artifact.id,
                }
            )
            raw = manifest.to_json_bytes()
            return dataclasses.replace(
                artifact,
                id=manifest.artifact_id,
                version=version,
                manifest_json=raw,
                signature=self._key.sign(raw),
                key_id=self._key.key_id,
                created_unix_ms=int(created.timestamp() * 1000),
            )

        record = await self._insert_next_version(*key, rerelease)
        log.info("re-released %s as %s (a rollback)", artifact.id, record.id)
        return record, True

    # ---------------------------------------------------------------- fleet
    async def list_devices(
        self, device_class: str, page_size: int = 0, page_token: str = ""
    ) -> DevicePage:
        """One page of the fleet in device-id order, and the token for the next one."""
        cls = validate.optional_name(device_class, "device_class")
        size = validate.int_range(page_size, "page_size", 0, MAX_DEVICE_PAGE) or DEVICE_PAGE
        start = PageToken.decode(page_token, scope=cls or "", key=(str,))
        after = str(start.after[0]) if start else ""
        # one more than asked: whether another page exists, without an empty last page
        views = await in_thread(self._store.list_devices, cls, after=after, limit=size + 1)
        return DevicePage(*cut_page(views, size, cls or "", lambda v: (v.device.device_id,)))

    async def remove_device(self, device_id: str, *, force: bool = False) -> RemovedDevice:
        """Forget a device that left the fleet (sold, broken, replaced), or one to register
        again afresh (under another class). One that is online is refused unless
        ``force``: its agent would register again at its next connection."""
        validate.name(device_id, "device_id")
        device = await in_thread(self._store.get_device, device_id)
        if device is None:
            raise not_found(
                f"device {device_id!r} is not registered; `homefleet devices` lists the fleet"
            )
        lease = device.watch_lease_until_ms or 0
        if lease > unix_ms() and not force:
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"device {device_id} is online (its agent is connected): stop its agent first, "
                f"or remove it anyway (`homefleet devices remove {device_id} --force`): it "
                "registers again when it next connects",
            )
        # its own assignments go as `unassign` takes them: a class behind a version the
        # device ran is re-released first, or the device (back, or another in the class)
        # would refuse the class's older manifest (QA: stuck on its pinned version)
        own = AssignTarget(TargetKind.DEVICE, device_id)
        desired = await in_thread(self._store.desired_set, device_id)
        models, rereleased = [], []
        for assignment in desired.assignments:
            if await in_thread(self._store.assigned, own, assignment.model_name) is None:
                continue
            taken = await self.unassign(assignment.model_name, device_id)
            models.append(assignment.model_name)
            if taken.rereleased_from:
                rereleased.append(f"{taken.rereleased_from} as {taken.artifact_id}")
        removed = await in_thread(self._store.remove_device, device_id)
        if removed is None:  # removed by another call meanwhile
            raise not_found(f"device {device_id!r} is not registered")
        removed = dataclasses.replace(
            removed,
            own_assignments=tuple(sorted({*models, *removed.own_assignments})),
            rereleased=tuple(rereleased),
        )
        # an open watch stream of the device ends (its desired set is NOT_FOUND now)
        self._notifier.notify(AssignTarget(TargetKind.DEVICE, device_id))
        log.info("device %s removed (%d telemetry windows)", device_id, removed.telemetry_windows)
        return removed

    async def list_events(
        self, after_id: int, limit: int, kind_prefix: str, *, newest: bool = False
    ) -> EventPage:
        validate.int_range(after_id, "after_id", 0, validate.MAX_INT64)
        validate.int_range(limit, "limit", 0, MAX_EVENT_LIMIT)
        validate.text(kind_prefix, "kind_prefix", MAX_KIND_PREFIX)
        size = limit or DEFAULT_EVENT_LIMIT
        # one more than asked: whether more events match, without another call
        found = await in_thread(
            self._store.list_events, after_id, size + 1, kind_prefix, newest=newest
        )
        more = len(found) > size
        found = (found[1:] if newest else found[:size]) if more else found
        if newest:  # the newest that fit in one message: cut from the oldest side
            fits = within_bytes(found[::-1])
            return EventPage(found[len(found) - fits :], more=more or fits < len(found))
        fits = within_bytes(found)
        return EventPage(found[:fits], more=more or fits < len(found))
