import datetime

from balsam_grpc.v1 import app_pb2 as _app_pb2
from balsam_grpc.v1 import common_pb2 as _common_pb2
from balsam_grpc.v1 import job_pb2 as _job_pb2
from balsam_grpc.v1 import session_pb2 as _session_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionFilter(_message.Message):
    __slots__ = ("ids", "site_ids", "batch_job_ids", "states")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SITE_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    site_ids: _containers.RepeatedScalarFieldContainer[int]
    batch_job_ids: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[_session_pb2.SessionState]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., site_ids: _Optional[_Iterable[int]] = ..., batch_job_ids: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[_Union[_session_pb2.SessionState, str]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: SessionFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[SessionFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_session_pb2.Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[_session_pb2.Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("site_id", "batch_job_id", "job_mode", "nodes", "resume_session_id", "hostname", "launcher_version")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_MODE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    batch_job_id: int
    job_mode: _common_pb2.JobMode
    nodes: _containers.RepeatedCompositeFieldContainer[_session_pb2.NodeInfo]
    resume_session_id: str
    hostname: str
    launcher_version: str
    def __init__(self, site_id: _Optional[int] = ..., batch_job_id: _Optional[int] = ..., job_mode: _Optional[_Union[_common_pb2.JobMode, str]] = ..., nodes: _Optional[_Iterable[_Union[_session_pb2.NodeInfo, _Mapping]]] = ..., resume_session_id: _Optional[str] = ..., hostname: _Optional[str] = ..., launcher_version: _Optional[str] = ...) -> None: ...

class SessionCredit(_message.Message):
    __slots__ = ("max_jobs", "free_nodes", "max_nodes_per_job", "wall_time_remaining_min", "serial_only", "filter_tags", "app_ids", "leases_received", "reserve_jobs", "reserve_nodes")
    class FilterTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    FREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_REMAINING_MIN_FIELD_NUMBER: _ClassVar[int]
    SERIAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    FILTER_TAGS_FIELD_NUMBER: _ClassVar[int]
    APP_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RESERVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    RESERVE_NODES_FIELD_NUMBER: _ClassVar[int]
    max_jobs: int
    free_nodes: float
    max_nodes_per_job: int
    wall_time_remaining_min: int
    serial_only: bool
    filter_tags: _containers.ScalarMap[str, str]
    app_ids: _containers.RepeatedScalarFieldContainer[int]
    leases_received: int
    reserve_jobs: int
    reserve_nodes: float
    def __init__(self, max_jobs: _Optional[int] = ..., free_nodes: _Optional[float] = ..., max_nodes_per_job: _Optional[int] = ..., wall_time_remaining_min: _Optional[int] = ..., serial_only: _Optional[bool] = ..., filter_tags: _Optional[_Mapping[str, str]] = ..., app_ids: _Optional[_Iterable[int]] = ..., leases_received: _Optional[int] = ..., reserve_jobs: _Optional[int] = ..., reserve_nodes: _Optional[float] = ...) -> None: ...

class JobTransition(_message.Message):
    __slots__ = ("seq", "job_id", "lease_generation", "state", "time", "return_code", "error_tail", "data", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RETURN_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TAIL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    job_id: int
    lease_generation: int
    state: _job_pb2.JobState
    time: _timestamp_pb2.Timestamp
    return_code: int
    error_tail: str
    data: _struct_pb2.Struct
    message: str
    def __init__(self, seq: _Optional[int] = ..., job_id: _Optional[int] = ..., lease_generation: _Optional[int] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., return_code: _Optional[int] = ..., error_tail: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class TransitionReport(_message.Message):
    __slots__ = ("transitions", "credit")
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    transitions: _containers.RepeatedCompositeFieldContainer[JobTransition]
    credit: SessionCredit
    def __init__(self, transitions: _Optional[_Iterable[_Union[JobTransition, _Mapping]]] = ..., credit: _Optional[_Union[SessionCredit, _Mapping]] = ...) -> None: ...

class SessionServiceConnectRequest(_message.Message):
    __slots__ = ("open", "credit", "report", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    credit: SessionCredit
    report: TransitionReport
    close: SessionClose
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., credit: _Optional[_Union[SessionCredit, _Mapping]] = ..., report: _Optional[_Union[TransitionReport, _Mapping]] = ..., close: _Optional[_Union[SessionClose, _Mapping]] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session", "lease_timeout_seconds", "applied_through_seq", "leased_jobs")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEASED_JOBS_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    lease_timeout_seconds: int
    applied_through_seq: int
    leased_jobs: _containers.RepeatedCompositeFieldContainer[LeasedJob]
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ..., lease_timeout_seconds: _Optional[int] = ..., applied_through_seq: _Optional[int] = ..., leased_jobs: _Optional[_Iterable[_Union[LeasedJob, _Mapping]]] = ...) -> None: ...

class LeasedJob(_message.Message):
    __slots__ = ("job", "app", "lease_generation", "job_token")
    JOB_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    LEASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    app: _app_pb2.App
    lease_generation: int
    job_token: str
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., app: _Optional[_Union[_app_pb2.App, _Mapping]] = ..., lease_generation: _Optional[int] = ..., job_token: _Optional[str] = ...) -> None: ...

class JobLeases(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[LeasedJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[LeasedJob, _Mapping]]] = ...) -> None: ...

class TransitionRejection(_message.Message):
    __slots__ = ("seq", "job_id", "code", "reason", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    job_id: int
    code: int
    reason: str
    message: str
    def __init__(self, seq: _Optional[int] = ..., job_id: _Optional[int] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TransitionAck(_message.Message):
    __slots__ = ("applied_through_seq", "rejections")
    APPLIED_THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    applied_through_seq: int
    rejections: _containers.RepeatedCompositeFieldContainer[TransitionRejection]
    def __init__(self, applied_through_seq: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[TransitionRejection, _Mapping]]] = ...) -> None: ...

class KillJobs(_message.Message):
    __slots__ = ("job_ids", "reason")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, job_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class SessionServiceConnectResponse(_message.Message):
    __slots__ = ("opened", "leases", "ack", "kill")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    leases: JobLeases
    ack: TransitionAck
    kill: KillJobs
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., leases: _Optional[_Union[JobLeases, _Mapping]] = ..., ack: _Optional[_Union[TransitionAck, _Mapping]] = ..., kill: _Optional[_Union[KillJobs, _Mapping]] = ...) -> None: ...
