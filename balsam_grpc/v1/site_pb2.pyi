import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackfillWindow(_message.Message):
    __slots__ = ("queue", "num_nodes", "wall_time_min")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    queue: str
    num_nodes: int
    wall_time_min: int
    def __init__(self, queue: _Optional[str] = ..., num_nodes: _Optional[int] = ..., wall_time_min: _Optional[int] = ...) -> None: ...

class QueueStatus(_message.Message):
    __slots__ = ("queue", "queued_jobs", "running_jobs", "idle_nodes", "total_nodes")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    IDLE_NODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    queue: str
    queued_jobs: int
    running_jobs: int
    idle_nodes: int
    total_nodes: int
    def __init__(self, queue: _Optional[str] = ..., queued_jobs: _Optional[int] = ..., running_jobs: _Optional[int] = ..., idle_nodes: _Optional[int] = ..., total_nodes: _Optional[int] = ...) -> None: ...

class SchedulerSnapshot(_message.Message):
    __slots__ = ("time", "queues", "backfill_windows")
    TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    BACKFILL_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    queues: _containers.RepeatedCompositeFieldContainer[QueueStatus]
    backfill_windows: _containers.RepeatedCompositeFieldContainer[BackfillWindow]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queues: _Optional[_Iterable[_Union[QueueStatus, _Mapping]]] = ..., backfill_windows: _Optional[_Iterable[_Union[BackfillWindow, _Mapping]]] = ...) -> None: ...

class SiteLiveness(_message.Message):
    __slots__ = ("connected", "last_seen_time", "daemon_version", "daemon_hostname")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_TIME_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    DAEMON_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    connected: bool
    last_seen_time: _timestamp_pb2.Timestamp
    daemon_version: str
    daemon_hostname: str
    def __init__(self, connected: _Optional[bool] = ..., last_seen_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., daemon_version: _Optional[str] = ..., daemon_hostname: _Optional[str] = ...) -> None: ...

class TransferLocation(_message.Message):
    __slots__ = ("alias", "url")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    alias: str
    url: str
    def __init__(self, alias: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class ElasticQueueSettings(_message.Message):
    __slots__ = ("enabled", "min_nodes", "max_nodes", "min_wall_time_min", "max_wall_time_min", "max_queued", "max_queue_wait_min", "use_backfill", "queue", "project", "job_mode", "max_total_nodes")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MIN_WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_WAIT_MIN_FIELD_NUMBER: _ClassVar[int]
    USE_BACKFILL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    JOB_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    min_nodes: int
    max_nodes: int
    min_wall_time_min: int
    max_wall_time_min: int
    max_queued: int
    max_queue_wait_min: int
    use_backfill: bool
    queue: str
    project: str
    job_mode: str
    max_total_nodes: int
    def __init__(self, enabled: _Optional[bool] = ..., min_nodes: _Optional[int] = ..., max_nodes: _Optional[int] = ..., min_wall_time_min: _Optional[int] = ..., max_wall_time_min: _Optional[int] = ..., max_queued: _Optional[int] = ..., max_queue_wait_min: _Optional[int] = ..., use_backfill: _Optional[bool] = ..., queue: _Optional[str] = ..., project: _Optional[str] = ..., job_mode: _Optional[str] = ..., max_total_nodes: _Optional[int] = ...) -> None: ...

class Site(_message.Message):
    __slots__ = ("id", "name", "hostname", "path", "owner", "scheduler", "allowed_queues", "allowed_projects", "optional_batch_job_params", "transfer_locations", "elastic_queue", "scheduler_snapshot", "liveness", "create_time", "update_time")
    class OptionalBatchJobParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_QUEUES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PROJECTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_BATCH_JOB_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    hostname: str
    path: str
    owner: str
    scheduler: str
    allowed_queues: _containers.RepeatedScalarFieldContainer[str]
    allowed_projects: _containers.RepeatedScalarFieldContainer[str]
    optional_batch_job_params: _containers.ScalarMap[str, str]
    transfer_locations: _containers.RepeatedCompositeFieldContainer[TransferLocation]
    elastic_queue: ElasticQueueSettings
    scheduler_snapshot: SchedulerSnapshot
    liveness: SiteLiveness
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., hostname: _Optional[str] = ..., path: _Optional[str] = ..., owner: _Optional[str] = ..., scheduler: _Optional[str] = ..., allowed_queues: _Optional[_Iterable[str]] = ..., allowed_projects: _Optional[_Iterable[str]] = ..., optional_batch_job_params: _Optional[_Mapping[str, str]] = ..., transfer_locations: _Optional[_Iterable[_Union[TransferLocation, _Mapping]]] = ..., elastic_queue: _Optional[_Union[ElasticQueueSettings, _Mapping]] = ..., scheduler_snapshot: _Optional[_Union[SchedulerSnapshot, _Mapping]] = ..., liveness: _Optional[_Union[SiteLiveness, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
