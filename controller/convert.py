"""The one place that turns protobuf messages into controller records and back.

``from_proto`` maps enums strictly (an unknown value is INVALID_ARGUMENT); other checks
belong to the handlers, so another transport gets the same ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from artifact.manifest import TensorSpec
from controller.errors import invalid
from controller.records import (
    ArtifactRecord,
    ArtifactRequest,
    AssignResult,
    AssignTarget,
    Chunk,
    DesiredAssignment,
    DesiredSet,
    DeviceModelState,
    DeviceRegistration,
    DeviceView,
    Encoding,
    EventRecord,
    FetchRequest,
    Hardware,
    HeldArtifact,
    ModelRecord,
    ModelUpload,
    Outcome,
    RegisterResult,
    StatusUpdate,
    TargetKind,
    TelemetryWindow,
)
from protos import fleet_pb2 as pb

_OUTCOME_TO_PROTO = {
    Outcome.DOWNLOADING: pb.DEPLOYMENT_OUTCOME_DOWNLOADING,
    Outcome.ACTIVE: pb.DEPLOYMENT_OUTCOME_ACTIVE,
    Outcome.FAILED: pb.DEPLOYMENT_OUTCOME_FAILED,
    Outcome.ROLLED_BACK: pb.DEPLOYMENT_OUTCOME_ROLLED_BACK,
}
_OUTCOME_FROM_PROTO: dict[int, Outcome] = {int(v): k for k, v in _OUTCOME_TO_PROTO.items()}
_ENCODING_TO_PROTO = {
    Encoding.FULL: pb.PAYLOAD_ENCODING_FULL,
    Encoding.DELTA: pb.PAYLOAD_ENCODING_DELTA,
}
_ENCODING_FROM_PROTO: dict[int, Encoding] = {int(v): k for k, v in _ENCODING_TO_PROTO.items()}


# -------------------------------------------------------------------- enums


def outcome_to_proto(outcome: Outcome | None) -> pb.DeploymentOutcome:
    return _OUTCOME_TO_PROTO[outcome] if outcome else pb.DEPLOYMENT_OUTCOME_UNSPECIFIED


def outcome_from_proto(value: int, field: str = "outcome") -> Outcome:
    if value not in _OUTCOME_FROM_PROTO:
        raise invalid(
            f"{field} must be DOWNLOADING, ACTIVE, FAILED or ROLLED_BACK, got {_enum_name(value)}"
        )
    return _OUTCOME_FROM_PROTO[value]


def encoding_to_proto(encoding: Encoding | None) -> pb.PayloadEncoding:
    return _ENCODING_TO_PROTO[encoding] if encoding else pb.PAYLOAD_ENCODING_UNSPECIFIED


def encoding_from_proto(value: int, field: str = "encoding") -> Encoding | None:
    if value == pb.PAYLOAD_ENCODING_UNSPECIFIED:
        return None
    if value not in _ENCODING_FROM_PROTO:
        raise invalid(f"{field} must be UNSPECIFIED, FULL or DELTA, got enum value {value}")
    return _ENCODING_FROM_PROTO[value]


def _enum_name(value: int) -> str:
    try:
        return pb.DeploymentOutcome.Name(value)
    except ValueError:
        return f"enum value {value}"


# -------------------------------------------------------------------- shared


def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))


def hardware_to_proto(hw: Hardware) -> pb.HardwareInfo:
    return pb.HardwareInfo(
        arch=hw.arch,
        cpu_cores=hw.cpu_cores,
        memory_bytes=hw.memory_bytes,
        onnxruntime_version=hw.onnxruntime_version,
        os=hw.os,
    )


def hardware_from_proto(msg: pb.HardwareInfo) -> Hardware:
    return Hardware(
        arch=msg.arch,
        cpu_cores=msg.cpu_cores,
        memory_bytes=msg.memory_bytes,
        onnxruntime_version=msg.onnxruntime_version,
        os=msg.os,
    )


# -------------------------------------------------------------------- admin


def upload_from_proto(header: pb.AddModelHeader) -> ModelUpload:
    return ModelUpload(
        name=header.name,
        description=header.description,
        size_bytes=header.size_bytes,
        sha256=header.sha256,
    )


def model_to_proto(model: ModelRecord) -> pb.Model:
    return pb.Model(
        name=model.name,
        version=model.version,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        inputs=[spec_to_proto(s) for s in model.inputs],
        outputs=[spec_to_proto(s) for s in model.outputs],
        description=model.description,
        created_unix_ms=model.created_unix_ms,
    )


def artifact_request_from_proto(msg: pb.CreateArtifactRequest) -> ArtifactRequest:
    return ArtifactRequest(
        model_name=msg.model_name,
        model_version=msg.model_version or None,
        device_class=msg.device_class,
        expires_in_days=msg.expires_in_days or None,
    )


def signed_manifest_to_proto(
    manifest_json: bytes, signature: bytes, key_id: str, key_chain: Sequence[bytes] = ()
) -> pb.SignedManifest:
    return pb.SignedManifest(
        manifest_json=manifest_json, signature=signature, key_id=key_id, key_chain=key_chain
    )


def artifact_to_proto(art: ArtifactRecord) -> pb.Artifact:
    return pb.Artifact(
        id=art.id,
        model_name=art.model_name,
        device_class=art.device_class,
        version=art.version,
        sha256=art.sha256,
        size_bytes=art.size_bytes,
        manifest=signed_manifest_to_proto(art.manifest_json, art.signature, art.key_id),
        created_unix_ms=art.created_unix_ms,
    )


def assign_target_from_proto(msg: pb.AssignRequest) -> AssignTarget | None:
    which = msg.WhichOneof("target")
    if which == "device_class":
        return AssignTarget(TargetKind.CLASS, msg.device_class)
    if which == "device_id":
        return AssignTarget(TargetKind.DEVICE, msg.device_id)
    return None


def device_to_proto(view: DeviceView) -> pb.Device:
    d = view.device
    return pb.Device(
        device_id=d.device_id,
        device_class=d.device_class,
        hardware=hardware_to_proto(d.hardware),
        status=pb.DEVICE_STATUS_ONLINE if view.online else pb.DEVICE_STATUS_OFFLINE,
        last_seen_unix_ms=d.last_seen_unix_ms,
        models=[device_model_to_proto(m) for m in view.models],
    )


def device_model_to_proto(state: DeviceModelState) -> pb.DeviceModelState:
    return pb.DeviceModelState(
        model_name=state.model_name,
        desired_sha256=state.desired_sha256,
        desired_artifact_id=state.desired_artifact_id,
        serving_sha256=state.serving_sha256,
        serving_artifact_id=state.serving_artifact_id,
        last_outcome=outcome_to_proto(state.last_outcome),
        last_reason=state.last_reason,
        bytes_received=state.bytes_received,
        encoding=encoding_to_proto(state.encoding),
        own_assignment=state.own_assignment,
    )


def assign_result_to_proto(result: AssignResult) -> pb.AssignResponse:
    return pb.AssignResponse(
        devices_affected=result.devices_affected,
        artifact_id=result.artifact_id,
        devices_keeping_own_ids=list(result.keeping_own),
        devices_keeping_own=result.keeping_own_count,
        rereleased_from=result.rereleased_from,
        warning=result.warning,
    )


def event_to_proto(event: EventRecord) -> pb.Event:
    return pb.Event(
        id=event.id,
        unix_ms=event.unix_ms,
        kind=event.kind,
        subject=event.subject,
        message=event.message,
        detail_json=json.dumps(event.detail, sort_keys=True, separators=(",", ":")),
    )


# -------------------------------------------------------------------- agents


def registration_from_proto(msg: pb.RegisterRequest) -> DeviceRegistration:
    return DeviceRegistration(
        device_id=msg.device_id,
        device_class=msg.device_class,
        hardware=hardware_from_proto(msg.hardware),
        held=tuple(HeldArtifact(h.model_name, h.sha256, h.active) for h in msg.held),
        agent_version=msg.agent_version,
    )


def register_to_proto(
    result: RegisterResult, heartbeat_seconds: int, max_chunk_bytes: int
) -> pb.RegisterResponse:
    return pb.RegisterResponse(
        device_id=result.device.device_id,
        heartbeat_seconds=heartbeat_seconds,
        max_chunk_bytes=max_chunk_bytes,
        warning=result.warning,
        new_device=not result.re_registered,
    )


def desired_to_proto(desired: DesiredSet, key_chain: Sequence[bytes] = ()) -> pb.AssignmentSet:
    """The desired set; ``key_chain`` goes with every manifest so agents can follow rotations."""
    return pb.AssignmentSet(
        assignments=[assignment_to_proto(a, key_chain) for a in desired.assignments],
        revision=desired.revision,
    )


def assignment_to_proto(a: DesiredAssignment, key_chain: Sequence[bytes] = ()) -> pb.Assignment:
    return pb.Assignment(
        model_name=a.model_name,
        artifact_sha256=a.sha256,
        size_bytes=a.size_bytes,
        manifest=signed_manifest_to_proto(a.manifest_json, a.signature, a.key_id, key_chain),
        repaired_unix_ms=a.repaired_unix_ms,
    )


def fetch_from_proto(msg: pb.FetchArtifactRequest) -> FetchRequest:
    return FetchRequest(
        device_id=msg.device_id,
        target_sha256=msg.target_sha256,
        base_sha256=msg.base_sha256,
        offset=msg.offset,
        chunk_bytes=msg.chunk_bytes,
        encoding=encoding_from_proto(msg.encoding),
    )


def chunk_to_proto(chunk: Chunk) -> pb.ArtifactChunk:
    return pb.ArtifactChunk(
        encoding=encoding_to_proto(chunk.encoding),
        total_bytes=chunk.total_bytes,
        payload_sha256=chunk.payload_sha256,
        offset=chunk.offset,
        data=chunk.data,
        base_sha256=chunk.base_sha256,
    )


def status_from_proto(msg: pb.StatusReport) -> StatusUpdate:
    return StatusUpdate(
        device_id=msg.device_id,
        model_name=msg.model_name,
        artifact_sha256=msg.artifact_sha256,
        outcome=outcome_from_proto(msg.outcome),
        reason=msg.reason,
        bytes_received=msg.bytes_received,
        encoding=encoding_from_proto(msg.encoding),
        serving_sha256=msg.serving_sha256,
    )


def window_from_proto(msg: pb.TelemetryWindow) -> TelemetryWindow:
    return TelemetryWindow(
        seq=msg.seq,
        model_name=msg.model_name,
        artifact_sha256=msg.artifact_sha256,
        start_unix_ms=msg.start_unix_ms,
        end_unix_ms=msg.end_unix_ms,
        count=msg.count,
        errors=msg.errors,
        latency_bucket_counts=tuple(msg.latency_bucket_counts),
        cpu_seconds=msg.cpu_seconds,
        joules=msg.joules,
        energy_source=msg.energy_source,
        peak_memory_bytes=msg.peak_memory_bytes,
    )
