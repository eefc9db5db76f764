import datetime

from balsam_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_ACTIVE: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]
    SESSION_STATE_EXPIRED: _ClassVar[SessionState]
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_ACTIVE: SessionState
SESSION_STATE_CLOSED: SessionState
SESSION_STATE_EXPIRED: SessionState

class NodeInfo(_message.Message):
    __slots__ = ("hostname", "cpus", "gpus")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    cpus: int
    gpus: int
    def __init__(self, hostname: _Optional[str] = ..., cpus: _Optional[int] = ..., gpus: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "site_id", "batch_job_id", "job_mode", "nodes", "state", "leased_jobs", "hostname", "create_time", "heartbeat_time", "expire_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_MODE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASED_JOBS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    site_id: int
    batch_job_id: int
    job_mode: _common_pb2.JobMode
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    state: SessionState
    leased_jobs: int
    hostname: str
    create_time: _timestamp_pb2.Timestamp
    heartbeat_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., site_id: _Optional[int] = ..., batch_job_id: _Optional[int] = ..., job_mode: _Optional[_Union[_common_pb2.JobMode, str]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., state: _Optional[_Union[SessionState, str]] = ..., leased_jobs: _Optional[int] = ..., hostname: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
