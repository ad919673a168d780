"""What the operator commands show: typed views of AdminService replies.

`from_proto` functions are the one place where wire messages become these views. The
views are the `--json` contract for scripts: integers stay integers, enums become short
lowercase names ("active", "online"), manifests and event details arrive parsed.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from pydantic import BaseModel, ConfigDict

from artifact.manifest import InvalidManifestError, Manifest
from protos import fleet_pb2


class View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorView(View):
    name: str
    dtype: str
    shape: list[int]


class ModelView(View):
    name: str
    version: int
    sha256: str
    size_bytes: int
    description: str
    inputs: list[TensorView]
    outputs: list[TensorView]
    created_unix_ms: int


class ArtifactView(View):
    id: str
    model_name: str
    device_class: str
    version: int
    sha256: str
    size_bytes: int
    created_unix_ms: int
    key_id: str
    signed: bool
    manifest: Manifest | None  # None when the controller sent no (valid) manifest
    warning: str = ""  # set when just created: why it may not suit its class


class HardwareView(View):
    arch: str
    cpu_cores: int
    memory_bytes: int
    onnxruntime_version: str
    os: str


class DeviceModelView(View):
    model_name: str
    desired_sha256: str
    desired_artifact_id: str
    serving_sha256: str
    serving_artifact_id: str
    last_outcome: str
    last_reason: str
    bytes_received: int
    encoding: str
    own_assignment: bool  # assigned to this device itself: class assignments pass it by


class DeviceView(View):
    device_id: str
    device_class: str
    status: str
    last_seen_unix_ms: int
    hardware: HardwareView
    models: list[DeviceModelView]


class EventView(View):
    id: int
    unix_ms: int
    kind: str
    subject: str
    message: str
    detail: dict[str, Any]


class AssignmentView(View):
    artifact_id: str  # what is assigned now (a re-release when going back to older bytes)
    requested_artifact_id: str
    device_class: str | None
    device_id: str | None
    devices_affected: int
    devices_keeping_own: int  # class targets: devices with an assignment of their own
    devices_keeping_own_ids: list[str]  # the first few of them
    rereleases: str = ""  # the artifact whose bytes artifact_id re-releases, if it does
    warning: str = ""  # the controller's, e.g. a class no file declares and no device has


class ModelList(View):
    models: list[ModelView]
    more: bool = False  # more versions exist than --limit listed


class ArtifactList(View):
    artifacts: list[ArtifactView]
    more: bool = False  # more artifacts match than --limit listed


class DeviceList(View):
    devices: list[DeviceView]
    more: bool = False  # more devices match than --limit listed


class EventList(View):
    events: list[EventView]
    more: bool = False  # more events match than were listed


def enum_label(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """``DEPLOYMENT_OUTCOME_ACTIVE`` -> ``active``; a value newer than this CLI stays visible."""
    try:
        name = enum.Name(value)
    except ValueError:
        return f"unknown-{value}"
    return name.removeprefix(prefix).lower()


def tensor_from_proto(spec: fleet_pb2.TensorSpec) -> TensorView:
    return TensorView(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))


def model_from_proto(model: fleet_pb2.Model) -> ModelView:
    return ModelView(
        name=model.name,
        version=model.version,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        description=model.description,
        inputs=[tensor_from_proto(t) for t in model.inputs],
        outputs=[tensor_from_proto(t) for t in model.outputs],
        created_unix_ms=model.created_unix_ms,
    )


def artifact_from_proto(artifact: fleet_pb2.Artifact) -> ArtifactView:
    manifest: Manifest | None = None
    if artifact.manifest.manifest_json:
        try:
            manifest = Manifest.from_json_bytes(artifact.manifest.manifest_json)
        except InvalidManifestError:
            manifest = None
    return ArtifactView(
        id=artifact.id,
        model_name=artifact.model_name,
        device_class=artifact.device_class,
        version=artifact.version,
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        created_unix_ms=artifact.created_unix_ms,
        key_id=artifact.manifest.key_id,
        signed=bool(artifact.manifest.signature),
        manifest=manifest,
        warning=artifact.warning,
    )


def device_model_from_proto(state: fleet_pb2.DeviceModelState) -> DeviceModelView:
    return DeviceModelView(
        model_name=state.model_name,
        desired_sha256=state.desired_sha256,
        desired_artifact_id=state.desired_artifact_id,
        serving_sha256=state.serving_sha256,
        serving_artifact_id=state.serving_artifact_id,
        last_outcome=enum_label(
            fleet_pb2.DeploymentOutcome, state.last_outcome, "DEPLOYMENT_OUTCOME_"
        ),
        last_reason=state.last_reason,
        bytes_received=state.bytes_received,
        encoding=enum_label(fleet_pb2.PayloadEncoding, state.encoding, "PAYLOAD_ENCODING_"),
        own_assignment=state.own_assignment,
    )


def device_from_proto(device: fleet_pb2.Device) -> DeviceView:
    hw = device.hardware
    return DeviceView(
        device_id=device.device_id,
        device_class=device.device_class,
        status=enum_label(fleet_pb2.DeviceStatus, device.status, "DEVICE_STATUS_"),
        last_seen_unix_ms=device.last_seen_unix_ms,
        hardware=HardwareView(
            arch=hw.arch,
            cpu_cores=hw.cpu_cores,
            memory_bytes=hw.memory_bytes,
            onnxruntime_version=hw.onnxruntime_version,
            os=hw.os,
        ),
        models=[device_model_from_proto(m) for m in device.models],
    )


def _parse_detail(detail_json: str) -> dict[str, Any]:
    """Event detail as an object; text that is not a JSON object is kept under "raw"."""
    if not detail_json:
        return {}
    try:
        detail = json.loads(detail_json)
    except ValueError:
        return {"raw": detail_json}
    return detail if isinstance(detail, dict) else {"raw": detail_json}


def event_from_proto(event: fleet_pb2.Event) -> EventView:
    return EventView(
        id=event.id,
        unix_ms=event.unix_ms,
        kind=event.kind,
        subject=event.subject,
        message=event.message,
        detail=_parse_detail(event.detail_json),
    )
