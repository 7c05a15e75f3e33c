from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "chunk_index", "chunk_count", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    chunk_index: int
    chunk_count: int
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("id", "field", "chunk_index", "chunk_count", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    field: str
    chunk_index: int
    chunk_count: int
    data: bytes
    def __init__(self, id: _Optional[int] = ..., field: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ManifestEntry(_message.Message):
    __slots__ = ("matrix", "shape", "numel", "dtype", "layer", "module", "shard_layout", "owner_rank", "expert")
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    SHARD_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OWNER_RANK_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    matrix: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    numel: int
    dtype: str
    layer: int
    module: str
    shard_layout: str
    owner_rank: int
    expert: int
    def __init__(self, matrix: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., numel: _Optional[int] = ..., dtype: _Optional[str] = ..., layer: _Optional[int] = ..., module: _Optional[str] = ..., shard_layout: _Optional[str] = ..., owner_rank: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("run", "incarnation", "resume_step", "client_version", "config_json", "manifest", "rank", "world_size", "channel_rank", "oversample")
    RUN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_RANK_FIELD_NUMBER: _ClassVar[int]
    OVERSAMPLE_FIELD_NUMBER: _ClassVar[int]
    run: str
    incarnation: int
    resume_step: int
    client_version: str
    config_json: str
    manifest: _containers.RepeatedCompositeFieldContainer[ManifestEntry]
    rank: int
    world_size: int
    channel_rank: int
    oversample: int
    def __init__(self, run: _Optional[str] = ..., incarnation: _Optional[int] = ..., resume_step: _Optional[int] = ..., client_version: _Optional[str] = ..., config_json: _Optional[str] = ..., manifest: _Optional[_Iterable[_Union[ManifestEntry, _Mapping]]] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., channel_rank: _Optional[int] = ..., oversample: _Optional[int] = ...) -> None: ...

class Sketch(_message.Message):
    __slots__ = ("G", "C", "convergence", "power_steps", "exact")
    G_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_FIELD_NUMBER: _ClassVar[int]
    POWER_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    G: Tensor
    C: Tensor
    convergence: float
    power_steps: int
    exact: bool
    def __init__(self, G: _Optional[_Union[Tensor, _Mapping]] = ..., C: _Optional[_Union[Tensor, _Mapping]] = ..., convergence: _Optional[float] = ..., power_steps: _Optional[int] = ..., exact: _Optional[bool] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("run", "incarnation", "matrix", "weight")
    RUN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    run: str
    incarnation: int
    matrix: str
    weight: Sketch
    def __init__(self, run: _Optional[str] = ..., incarnation: _Optional[int] = ..., matrix: _Optional[str] = ..., weight: _Optional[_Union[Sketch, _Mapping]] = ...) -> None: ...

class MatrixReport(_message.Message):
    __slots__ = ("run", "incarnation", "matrix", "step", "shape", "numel", "frobenius_sq", "visible_count", "visible_low_count", "visible_principal_count", "channel_energy_sq", "update", "weight", "lock_step", "locked_now", "v_ref", "dropped_reports")
    RUN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    FROBENIUS_SQ_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_LOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_PRINCIPAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ENERGY_SQ_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOCK_STEP_FIELD_NUMBER: _ClassVar[int]
    LOCKED_NOW_FIELD_NUMBER: _ClassVar[int]
    V_REF_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    run: str
    incarnation: int
    matrix: str
    step: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    numel: int
    frobenius_sq: float
    visible_count: int
    visible_low_count: int
    visible_principal_count: int
    channel_energy_sq: float
    update: Sketch
    weight: Sketch
    lock_step: int
    locked_now: bool
    v_ref: Tensor
    dropped_reports: int
    def __init__(self, run: _Optional[str] = ..., incarnation: _Optional[int] = ..., matrix: _Optional[str] = ..., step: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., numel: _Optional[int] = ..., frobenius_sq: _Optional[float] = ..., visible_count: _Optional[int] = ..., visible_low_count: _Optional[int] = ..., visible_principal_count: _Optional[int] = ..., channel_energy_sq: _Optional[float] = ..., update: _Optional[_Union[Sketch, _Mapping]] = ..., weight: _Optional[_Union[Sketch, _Mapping]] = ..., lock_step: _Optional[int] = ..., locked_now: _Optional[bool] = ..., v_ref: _Optional[_Union[Tensor, _Mapping]] = ..., dropped_reports: _Optional[int] = ...) -> None: ...

class AuditBlock(_message.Message):
    __slots__ = ("run", "incarnation", "matrix", "step", "row_offset", "col_offset", "delta", "skipped_audits")
    RUN_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_AUDITS_FIELD_NUMBER: _ClassVar[int]
    run: str
    incarnation: int
    matrix: str
    step: int
    row_offset: int
    col_offset: int
    delta: Tensor
    skipped_audits: int
    def __init__(self, run: _Optional[str] = ..., incarnation: _Optional[int] = ..., matrix: _Optional[str] = ..., step: _Optional[int] = ..., row_offset: _Optional[int] = ..., col_offset: _Optional[int] = ..., delta: _Optional[_Union[Tensor, _Mapping]] = ..., skipped_audits: _Optional[int] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("run", "reason")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run: str
    reason: str
    def __init__(self, run: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("id", "hello", "baseline", "report", "chunk", "goodbye", "audit")
    ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    id: int
    hello: Hello
    baseline: Baseline
    report: MatrixReport
    chunk: TensorChunk
    goodbye: Goodbye
    audit: AuditBlock
    def __init__(self, id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ..., report: _Optional[_Union[MatrixReport, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., audit: _Optional[_Union[AuditBlock, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("ids", "resend_baselines")
    IDS_FIELD_NUMBER: _ClassVar[int]
    RESEND_BASELINES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    resend_baselines: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., resend_baselines: _Optional[bool] = ...) -> None: ...

class LockReference(_message.Message):
    __slots__ = ("run", "matrix", "lock_step", "v_ref")
    RUN_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    LOCK_STEP_FIELD_NUMBER: _ClassVar[int]
    V_REF_FIELD_NUMBER: _ClassVar[int]
    run: str
    matrix: str
    lock_step: int
    v_ref: Tensor
    def __init__(self, run: _Optional[str] = ..., matrix: _Optional[str] = ..., lock_step: _Optional[int] = ..., v_ref: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "rule", "run", "matrix", "state", "severity", "started_at", "ended_at", "value", "summary")
    ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    id: str
    rule: str
    run: str
    matrix: str
    state: str
    severity: str
    started_at: str
    ended_at: str
    value: float
    summary: str
    def __init__(self, id: _Optional[str] = ..., rule: _Optional[str] = ..., run: _Optional[str] = ..., matrix: _Optional[str] = ..., state: _Optional[str] = ..., severity: _Optional[str] = ..., started_at: _Optional[str] = ..., ended_at: _Optional[str] = ..., value: _Optional[float] = ..., summary: _Optional[str] = ...) -> None: ...

class RunAggregate(_message.Message):
    __slots__ = ("run", "step", "aggregate_json")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_JSON_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    aggregate_json: str
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ..., aggregate_json: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("id", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: str
    message: str
    def __init__(self, id: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("ack", "lock_reference", "alert", "error", "aggregate")
    ACK_FIELD_NUMBER: _ClassVar[int]
    LOCK_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    lock_reference: LockReference
    alert: Alert
    error: Error
    aggregate: RunAggregate
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., lock_reference: _Optional[_Union[LockReference, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., aggregate: _Optional[_Union[RunAggregate, _Mapping]] = ...) -> None: ...
