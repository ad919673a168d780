from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_ENCODING_UNSPECIFIED: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_FULL: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_DELTA: _ClassVar[PayloadEncoding]

class DeploymentOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_OUTCOME_UNSPECIFIED: _ClassVar[DeploymentOutcome]
    DEPLOYMENT_OUTCOME_DOWNLOADING: _ClassVar[DeploymentOutcome]
    DEPLOYMENT_OUTCOME_ACTIVE: _ClassVar[DeploymentOutcome]
    DEPLOYMENT_OUTCOME_FAILED: _ClassVar[DeploymentOutcome]
    DEPLOYMENT_OUTCOME_ROLLED_BACK: _ClassVar[DeploymentOutcome]

class DeviceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATUS_UNSPECIFIED: _ClassVar[DeviceStatus]
    DEVICE_STATUS_ONLINE: _ClassVar[DeviceStatus]
    DEVICE_STATUS_OFFLINE: _ClassVar[DeviceStatus]

class CompressionJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_JOB_STATE_UNSPECIFIED: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_QUEUED: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_RUNNING: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_SUCCEEDED: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_NOT_MET: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_FAILED: _ClassVar[CompressionJobState]
    COMPRESSION_JOB_STATE_CANCELLED: _ClassVar[CompressionJobState]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_RECOMPRESSING: _ClassVar[RolloutState]
    ROLLOUT_STATE_CANARY: _ClassVar[RolloutState]
    ROLLOUT_STATE_PROMOTED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]
    ROLLOUT_STATE_FAILED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
PAYLOAD_ENCODING_UNSPECIFIED: PayloadEncoding
PAYLOAD_ENCODING_FULL: PayloadEncoding
PAYLOAD_ENCODING_DELTA: PayloadEncoding
DEPLOYMENT_OUTCOME_UNSPECIFIED: DeploymentOutcome
DEPLOYMENT_OUTCOME_DOWNLOADING: DeploymentOutcome
DEPLOYMENT_OUTCOME_ACTIVE: DeploymentOutcome
DEPLOYMENT_OUTCOME_FAILED: DeploymentOutcome
DEPLOYMENT_OUTCOME_ROLLED_BACK: DeploymentOutcome
DEVICE_STATUS_UNSPECIFIED: DeviceStatus
DEVICE_STATUS_ONLINE: DeviceStatus
DEVICE_STATUS_OFFLINE: DeviceStatus
COMPRESSION_JOB_STATE_UNSPECIFIED: CompressionJobState
COMPRESSION_JOB_STATE_QUEUED: CompressionJobState
COMPRESSION_JOB_STATE_RUNNING: CompressionJobState
COMPRESSION_JOB_STATE_SUCCEEDED: CompressionJobState
COMPRESSION_JOB_STATE_NOT_MET: CompressionJobState
COMPRESSION_JOB_STATE_FAILED: CompressionJobState
COMPRESSION_JOB_STATE_CANCELLED: CompressionJobState
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_RECOMPRESSING: RolloutState
ROLLOUT_STATE_CANARY: RolloutState
ROLLOUT_STATE_PROMOTED: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState
ROLLOUT_STATE_FAILED: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("manifest_json", "signature", "key_id", "key_chain")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_CHAIN_FIELD_NUMBER: _ClassVar[int]
    manifest_json: bytes
    signature: bytes
    key_id: str
    key_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., key_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HardwareInfo(_message.Message):
    __slots__ = ("arch", "cpu_cores", "memory_bytes", "onnxruntime_version", "os")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    arch: str
    cpu_cores: int
    memory_bytes: int
    onnxruntime_version: str
    os: str
    def __init__(self, arch: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., onnxruntime_version: _Optional[str] = ..., os: _Optional[str] = ...) -> None: ...

class HeldArtifact(_message.Message):
    __slots__ = ("model_name", "sha256", "active")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    sha256: str
    active: bool
    def __init__(self, model_name: _Optional[str] = ..., sha256: _Optional[str] = ..., active: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "device_class", "hardware", "held", "agent_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    hardware: HardwareInfo
    held: _containers.RepeatedCompositeFieldContainer[HeldArtifact]
    agent_version: str
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., hardware: _Optional[_Union[HardwareInfo, _Mapping]] = ..., held: _Optional[_Iterable[_Union[HeldArtifact, _Mapping]]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "heartbeat_seconds", "max_chunk_bytes", "warning", "new_device")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    NEW_DEVICE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    heartbeat_seconds: int
    max_chunk_bytes: int
    warning: str
    new_device: bool
    def __init__(self, device_id: _Optional[str] = ..., heartbeat_seconds: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., warning: _Optional[str] = ..., new_device: _Optional[bool] = ...) -> None: ...

class WatchAssignmentsRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("model_name", "artifact_sha256", "size_bytes", "manifest", "repaired_unix_ms")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    artifact_sha256: str
    size_bytes: int
    manifest: SignedManifest
    repaired_unix_ms: int
    def __init__(self, model_name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., manifest: _Optional[_Union[SignedManifest, _Mapping]] = ..., repaired_unix_ms: _Optional[int] = ...) -> None: ...

class AssignmentSet(_message.Message):
    __slots__ = ("assignments", "revision")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    revision: int
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("device_id", "target_sha256", "base_sha256", "offset", "chunk_bytes", "encoding")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    target_sha256: str
    base_sha256: str
    offset: int
    chunk_bytes: int
    encoding: PayloadEncoding
    def __init__(self, device_id: _Optional[str] = ..., target_sha256: _Optional[str] = ..., base_sha256: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("encoding", "total_bytes", "payload_sha256", "offset", "data", "base_sha256")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    encoding: PayloadEncoding
    total_bytes: int
    payload_sha256: str
    offset: int
    data: bytes
    base_sha256: str
    def __init__(self, encoding: _Optional[_Union[PayloadEncoding, str]] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., base_sha256: _Optional[str] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("device_id", "model_name", "artifact_sha256", "outcome", "reason", "bytes_received", "encoding", "serving_sha256")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SERVING_SHA256_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model_name: str
    artifact_sha256: str
    outcome: DeploymentOutcome
    reason: str
    bytes_received: int
    encoding: PayloadEncoding
    serving_sha256: str
    def __init__(self, device_id: _Optional[str] = ..., model_name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., outcome: _Optional[_Union[DeploymentOutcome, str]] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ..., serving_sha256: _Optional[str] = ...) -> None: ...

class StatusAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TelemetryWindow(_message.Message):
    __slots__ = ("seq", "model_name", "artifact_sha256", "start_unix_ms", "end_unix_ms", "count", "errors", "latency_bucket_counts", "cpu_seconds", "joules", "energy_source", "peak_memory_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    model_name: str
    artifact_sha256: str
    start_unix_ms: int
    end_unix_ms: int
    count: int
    errors: int
    latency_bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    cpu_seconds: float
    joules: float
    energy_source: str
    peak_memory_bytes: int
    def __init__(self, seq: _Optional[int] = ..., model_name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., start_unix_ms: _Optional[int] = ..., end_unix_ms: _Optional[int] = ..., count: _Optional[int] = ..., errors: _Optional[int] = ..., latency_bucket_counts: _Optional[_Iterable[int]] = ..., cpu_seconds: _Optional[float] = ..., joules: _Optional[float] = ..., energy_source: _Optional[str] = ..., peak_memory_bytes: _Optional[int] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("device_id", "windows")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    windows: _containers.RepeatedCompositeFieldContainer[TelemetryWindow]
    def __init__(self, device_id: _Optional[str] = ..., windows: _Optional[_Iterable[_Union[TelemetryWindow, _Mapping]]] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("highest_seq",)
    HIGHEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    highest_seq: int
    def __init__(self, highest_seq: _Optional[int] = ...) -> None: ...

class AddModelHeader(_message.Message):
    __slots__ = ("name", "description", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class AddModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: AddModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[AddModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "version", "sha256", "size_bytes", "inputs", "outputs", "description", "created_unix_ms", "unchanged", "interface_change", "repaired")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    size_bytes: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    description: str
    created_unix_ms: int
    unchanged: bool
    interface_change: str
    repaired: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., description: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., unchanged: _Optional[bool] = ..., interface_change: _Optional[str] = ..., repaired: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateArtifactRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "device_class", "expires_in_days")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_DAYS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    device_class: str
    expires_in_days: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., device_class: _Optional[str] = ..., expires_in_days: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("id", "model_name", "device_class", "version", "sha256", "size_bytes", "manifest", "created_unix_ms", "warning")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_name: str
    device_class: str
    version: int
    sha256: str
    size_bytes: int
    manifest: SignedManifest
    created_unix_ms: int
    warning: str
    def __init__(self, id: _Optional[str] = ..., model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., manifest: _Optional[_Union[SignedManifest, _Mapping]] = ..., created_unix_ms: _Optional[int] = ..., warning: _Optional[str] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("model_name", "device_class", "page_size", "page_token")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    page_size: int
    page_token: str
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("artifact_id", "device_class", "device_id")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    device_class: str
    device_id: str
    def __init__(self, artifact_id: _Optional[str] = ..., device_class: _Optional[str] = ..., device_id: _Optional[str] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("devices_affected", "artifact_id", "devices_keeping_own_ids", "devices_keeping_own", "rereleased_from", "warning")
    DEVICES_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_KEEPING_OWN_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_KEEPING_OWN_FIELD_NUMBER: _ClassVar[int]
    RERELEASED_FROM_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    devices_affected: int
    artifact_id: str
    devices_keeping_own_ids: _containers.RepeatedScalarFieldContainer[str]
    devices_keeping_own: int
    rereleased_from: str
    warning: str
    def __init__(self, devices_affected: _Optional[int] = ..., artifact_id: _Optional[str] = ..., devices_keeping_own_ids: _Optional[_Iterable[str]] = ..., devices_keeping_own: _Optional[int] = ..., rereleased_from: _Optional[str] = ..., warning: _Optional[str] = ...) -> None: ...

class UnassignRequest(_message.Message):
    __slots__ = ("model_name", "device_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_id: str
    def __init__(self, model_name: _Optional[str] = ..., device_id: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "device_class", "hardware", "status", "last_seen_unix_ms", "models")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    hardware: HardwareInfo
    status: DeviceStatus
    last_seen_unix_ms: int
    models: _containers.RepeatedCompositeFieldContainer[DeviceModelState]
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., hardware: _Optional[_Union[HardwareInfo, _Mapping]] = ..., status: _Optional[_Union[DeviceStatus, str]] = ..., last_seen_unix_ms: _Optional[int] = ..., models: _Optional[_Iterable[_Union[DeviceModelState, _Mapping]]] = ...) -> None: ...

class DeviceModelState(_message.Message):
    __slots__ = ("model_name", "desired_sha256", "desired_artifact_id", "serving_sha256", "serving_artifact_id", "last_outcome", "last_reason", "bytes_received", "encoding", "own_assignment")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DESIRED_SHA256_FIELD_NUMBER: _ClassVar[int]
    DESIRED_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_SHA256_FIELD_NUMBER: _ClassVar[int]
    SERVING_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OWN_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    desired_sha256: str
    desired_artifact_id: str
    serving_sha256: str
    serving_artifact_id: str
    last_outcome: DeploymentOutcome
    last_reason: str
    bytes_received: int
    encoding: PayloadEncoding
    own_assignment: bool
    def __init__(self, model_name: _Optional[str] = ..., desired_sha256: _Optional[str] = ..., desired_artifact_id: _Optional[str] = ..., serving_sha256: _Optional[str] = ..., serving_artifact_id: _Optional[str] = ..., last_outcome: _Optional[_Union[DeploymentOutcome, str]] = ..., last_reason: _Optional[str] = ..., bytes_received: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ..., own_assignment: _Optional[bool] = ...) -> None: ...

class RemoveDeviceRequest(_message.Message):
    __slots__ = ("device_id", "force")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    force: bool
    def __init__(self, device_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveDeviceResponse(_message.Message):
    __slots__ = ("device_id", "device_class", "own_assignments", "telemetry_windows", "event_id", "rereleased")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    OWN_ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RERELEASED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    own_assignments: _containers.RepeatedScalarFieldContainer[str]
    telemetry_windows: int
    event_id: int
    rereleased: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., own_assignments: _Optional[_Iterable[str]] = ..., telemetry_windows: _Optional[int] = ..., event_id: _Optional[int] = ..., rereleased: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("device_class", "page_size", "page_token")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    page_size: int
    page_token: str
    def __init__(self, device_class: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "unix_ms", "kind", "subject", "message", "detail_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    unix_ms: int
    kind: str
    subject: str
    message: str
    detail_json: str
    def __init__(self, id: _Optional[int] = ..., unix_ms: _Optional[int] = ..., kind: _Optional[str] = ..., subject: _Optional[str] = ..., message: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("after_id", "limit", "kind_prefix", "newest")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KIND_PREFIX_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    limit: int
    kind_prefix: str
    newest: bool
    def __init__(self, after_id: _Optional[int] = ..., limit: _Optional[int] = ..., kind_prefix: _Optional[str] = ..., newest: _Optional[bool] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "more")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    more: bool
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class BudgetOverrides(_message.Message):
    __slots__ = ("min_fidelity", "max_accuracy_drop", "max_bytes", "max_size_ratio", "p95_ms")
    MIN_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_RATIO_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    min_fidelity: float
    max_accuracy_drop: float
    max_bytes: int
    max_size_ratio: float
    p95_ms: float
    def __init__(self, min_fidelity: _Optional[float] = ..., max_accuracy_drop: _Optional[float] = ..., max_bytes: _Optional[int] = ..., max_size_ratio: _Optional[float] = ..., p95_ms: _Optional[float] = ...) -> None: ...

class StartCompressionHeader(_message.Message):
    __slots__ = ("model", "workload", "device_class_yaml", "budgets", "calibration_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_YAML_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    workload: str
    device_class_yaml: str
    budgets: BudgetOverrides
    calibration_bytes: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., workload: _Optional[str] = ..., device_class_yaml: _Optional[str] = ..., budgets: _Optional[_Union[BudgetOverrides, _Mapping]] = ..., calibration_bytes: _Optional[int] = ...) -> None: ...

class StartCompressionChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: StartCompressionHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[StartCompressionHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("id", "model_name", "device_class", "state", "baseline_artifact_id", "candidate_artifact_id", "job_id", "canary_devices", "relative_speed", "p95_target_ms", "reason", "created_unix_ms", "updated_unix_ms", "finished_unix_ms", "paused")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CANARY_DEVICES_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_SPEED_FIELD_NUMBER: _ClassVar[int]
    P95_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    device_class: str
    state: RolloutState
    baseline_artifact_id: str
    candidate_artifact_id: str
    job_id: int
    canary_devices: _containers.RepeatedScalarFieldContainer[str]
    relative_speed: float
    p95_target_ms: float
    reason: str
    created_unix_ms: int
    updated_unix_ms: int
    finished_unix_ms: int
    paused: bool
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., state: _Optional[_Union[RolloutState, str]] = ..., baseline_artifact_id: _Optional[str] = ..., candidate_artifact_id: _Optional[str] = ..., job_id: _Optional[int] = ..., canary_devices: _Optional[_Iterable[str]] = ..., relative_speed: _Optional[float] = ..., p95_target_ms: _Optional[float] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., paused: _Optional[bool] = ...) -> None: ...

class RolloutPause(_message.Message):
    __slots__ = ("model_name", "device_class", "paused_by", "reason", "paused_unix_ms", "verdict", "verdict_unix_ms")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    paused_by: str
    reason: str
    paused_unix_ms: int
    verdict: str
    verdict_unix_ms: int
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., paused_by: _Optional[str] = ..., reason: _Optional[str] = ..., paused_unix_ms: _Optional[int] = ..., verdict: _Optional[str] = ..., verdict_unix_ms: _Optional[int] = ...) -> None: ...

class PauseRolloutsRequest(_message.Message):
    __slots__ = ("model_name", "device_class", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeRolloutsRequest(_message.Message):
    __slots__ = ("model_name", "device_class")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ...) -> None: ...

class AbortRolloutRequest(_message.Message):
    __slots__ = ("rollout_id", "reason")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rollout_id: int
    reason: str
    def __init__(self, rollout_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("model_name", "device_class", "active_only", "limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    active_only: bool
    limit: int
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., active_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts", "pauses")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    pauses: _containers.RepeatedCompositeFieldContainer[RolloutPause]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ..., pauses: _Optional[_Iterable[_Union[RolloutPause, _Mapping]]] = ...) -> None: ...

class CompressionTrial(_message.Message):
    __slots__ = ("index", "summary", "recipe", "met", "artifact_bytes", "quality_metric", "quality_value", "p95_ms", "energy_mj", "seconds", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUALITY_METRIC_FIELD_NUMBER: _ClassVar[int]
    QUALITY_VALUE_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MJ_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    summary: str
    recipe: str
    met: bool
    artifact_bytes: int
    quality_metric: str
    quality_value: float
    p95_ms: float
    energy_mj: float
    seconds: float
    error: str
    def __init__(self, index: _Optional[int] = ..., summary: _Optional[str] = ..., recipe: _Optional[str] = ..., met: _Optional[bool] = ..., artifact_bytes: _Optional[int] = ..., quality_metric: _Optional[str] = ..., quality_value: _Optional[float] = ..., p95_ms: _Optional[float] = ..., energy_mj: _Optional[float] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class BudgetVerdict(_message.Message):
    __slots__ = ("budget", "limit", "observed", "met", "gap")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    MET_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    budget: str
    limit: float
    observed: float
    met: bool
    gap: float
    def __init__(self, budget: _Optional[str] = ..., limit: _Optional[float] = ..., observed: _Optional[float] = ..., met: _Optional[bool] = ..., gap: _Optional[float] = ...) -> None: ...

class CompressionJob(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "workload", "device_class", "state", "error", "created_unix_ms", "started_unix_ms", "finished_unix_ms", "trials_done", "trials", "artifact_id", "recipe", "verdicts", "activity", "warnings")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRIALS_DONE_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    model_version: int
    workload: str
    device_class: str
    state: CompressionJobState
    error: str
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    trials_done: int
    trials: _containers.RepeatedCompositeFieldContainer[CompressionTrial]
    artifact_id: str
    recipe: str
    verdicts: _containers.RepeatedCompositeFieldContainer[BudgetVerdict]
    activity: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., workload: _Optional[str] = ..., device_class: _Optional[str] = ..., state: _Optional[_Union[CompressionJobState, str]] = ..., error: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., trials_done: _Optional[int] = ..., trials: _Optional[_Iterable[_Union[CompressionTrial, _Mapping]]] = ..., artifact_id: _Optional[str] = ..., recipe: _Optional[str] = ..., verdicts: _Optional[_Iterable[_Union[BudgetVerdict, _Mapping]]] = ..., activity: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class CompressionJobRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ListCompressionJobsRequest(_message.Message):
    __slots__ = ("model_name", "device_class", "limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    device_class: str
    limit: int
    def __init__(self, model_name: _Optional[str] = ..., device_class: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListCompressionJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[CompressionJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[CompressionJob, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model_name", "inputs")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model_name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "artifact_sha256")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    artifact_sha256: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class LocalModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocalModel(_message.Message):
    __slots__ = ("model_name", "artifact_sha256", "previous_sha256", "inputs", "outputs")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    artifact_sha256: str
    previous_sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, model_name: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., previous_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class LocalModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[LocalModel]
    def __init__(self, models: _Optional[_Iterable[_Union[LocalModel, _Mapping]]] = ...) -> None: ...
