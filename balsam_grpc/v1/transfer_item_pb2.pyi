import datetime

from balsam_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATE_UNSPECIFIED: _ClassVar[TransferState]
    TRANSFER_STATE_AWAITING_JOB: _ClassVar[TransferState]
    TRANSFER_STATE_PENDING: _ClassVar[TransferState]
    TRANSFER_STATE_ACTIVE: _ClassVar[TransferState]
    TRANSFER_STATE_DONE: _ClassVar[TransferState]
    TRANSFER_STATE_ERROR: _ClassVar[TransferState]
TRANSFER_STATE_UNSPECIFIED: TransferState
TRANSFER_STATE_AWAITING_JOB: TransferState
TRANSFER_STATE_PENDING: TransferState
TRANSFER_STATE_ACTIVE: TransferState
TRANSFER_STATE_DONE: TransferState
TRANSFER_STATE_ERROR: TransferState

class TransferMetrics(_message.Message):
    __slots__ = ("bytes", "files", "duration_seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    files: int
    duration_seconds: float
    def __init__(self, bytes: _Optional[int] = ..., files: _Optional[int] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class TransferItem(_message.Message):
    __slots__ = ("id", "job_id", "site_id", "direction", "slot", "location_alias", "remote_path", "local_path", "recursive", "state", "task_id", "error", "metrics", "create_time", "update_time", "job_workdir")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LOCATION_ALIAS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PATH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_WORKDIR_FIELD_NUMBER: _ClassVar[int]
    id: int
    job_id: int
    site_id: int
    direction: _common_pb2.TransferDirection
    slot: str
    location_alias: str
    remote_path: str
    local_path: str
    recursive: bool
    state: TransferState
    task_id: str
    error: str
    metrics: TransferMetrics
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    job_workdir: str
    def __init__(self, id: _Optional[int] = ..., job_id: _Optional[int] = ..., site_id: _Optional[int] = ..., direction: _Optional[_Union[_common_pb2.TransferDirection, str]] = ..., slot: _Optional[str] = ..., location_alias: _Optional[str] = ..., remote_path: _Optional[str] = ..., local_path: _Optional[str] = ..., recursive: _Optional[bool] = ..., state: _Optional[_Union[TransferState, str]] = ..., task_id: _Optional[str] = ..., error: _Optional[str] = ..., metrics: _Optional[_Union[TransferMetrics, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_workdir: _Optional[str] = ...) -> None: ...
