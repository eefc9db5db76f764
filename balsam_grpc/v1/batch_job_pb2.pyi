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

class BatchJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_JOB_STATE_UNSPECIFIED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_PENDING_SUBMISSION: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_SUBMIT_FAILED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_QUEUED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_RUNNING: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_PENDING_DELETION: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_FINISHED: _ClassVar[BatchJobState]
BATCH_JOB_STATE_UNSPECIFIED: BatchJobState
BATCH_JOB_STATE_PENDING_SUBMISSION: BatchJobState
BATCH_JOB_STATE_SUBMIT_FAILED: BatchJobState
BATCH_JOB_STATE_QUEUED: BatchJobState
BATCH_JOB_STATE_RUNNING: BatchJobState
BATCH_JOB_STATE_PENDING_DELETION: BatchJobState
BATCH_JOB_STATE_FINISHED: BatchJobState

class Partition(_message.Message):
    __slots__ = ("job_mode", "num_nodes", "filter_tags")
    class FilterTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    FILTER_TAGS_FIELD_NUMBER: _ClassVar[int]
    job_mode: _common_pb2.JobMode
    num_nodes: int
    filter_tags: _containers.ScalarMap[str, str]
    def __init__(self, job_mode: _Optional[_Union[_common_pb2.JobMode, str]] = ..., num_nodes: _Optional[int] = ..., filter_tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchJob(_message.Message):
    __slots__ = ("id", "site_id", "scheduler_id", "project", "queue", "num_nodes", "wall_time_min", "job_mode", "partitions", "filter_tags", "optional_params", "state", "status_info", "start_time", "end_time", "create_time", "update_time")
    class FilterTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OptionalParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    JOB_MODE_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    FILTER_TAGS_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_INFO_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    site_id: int
    scheduler_id: str
    project: str
    queue: str
    num_nodes: int
    wall_time_min: int
    job_mode: _common_pb2.JobMode
    partitions: _containers.RepeatedCompositeFieldContainer[Partition]
    filter_tags: _containers.ScalarMap[str, str]
    optional_params: _containers.ScalarMap[str, str]
    state: BatchJobState
    status_info: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., site_id: _Optional[int] = ..., scheduler_id: _Optional[str] = ..., project: _Optional[str] = ..., queue: _Optional[str] = ..., num_nodes: _Optional[int] = ..., wall_time_min: _Optional[int] = ..., job_mode: _Optional[_Union[_common_pb2.JobMode, str]] = ..., partitions: _Optional[_Iterable[_Union[Partition, _Mapping]]] = ..., filter_tags: _Optional[_Mapping[str, str]] = ..., optional_params: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[BatchJobState, str]] = ..., status_info: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
