import datetime

from balsam_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_CREATED: _ClassVar[JobState]
    JOB_STATE_AWAITING_PARENTS: _ClassVar[JobState]
    JOB_STATE_READY: _ClassVar[JobState]
    JOB_STATE_STAGED_IN: _ClassVar[JobState]
    JOB_STATE_PREPROCESSED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_RUN_DONE: _ClassVar[JobState]
    JOB_STATE_RUN_ERROR: _ClassVar[JobState]
    JOB_STATE_RUN_TIMEOUT: _ClassVar[JobState]
    JOB_STATE_RESTART_READY: _ClassVar[JobState]
    JOB_STATE_POSTPROCESSED: _ClassVar[JobState]
    JOB_STATE_STAGED_OUT: _ClassVar[JobState]
    JOB_STATE_JOB_FINISHED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_KILLED: _ClassVar[JobState]

class ParentFailurePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARENT_FAILURE_POLICY_UNSPECIFIED: _ClassVar[ParentFailurePolicy]
    PARENT_FAILURE_POLICY_FAIL: _ClassVar[ParentFailurePolicy]
    PARENT_FAILURE_POLICY_IGNORE: _ClassVar[ParentFailurePolicy]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_CREATED: JobState
JOB_STATE_AWAITING_PARENTS: JobState
JOB_STATE_READY: JobState
JOB_STATE_STAGED_IN: JobState
JOB_STATE_PREPROCESSED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_RUN_DONE: JobState
JOB_STATE_RUN_ERROR: JobState
JOB_STATE_RUN_TIMEOUT: JobState
JOB_STATE_RESTART_READY: JobState
JOB_STATE_POSTPROCESSED: JobState
JOB_STATE_STAGED_OUT: JobState
JOB_STATE_JOB_FINISHED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_KILLED: JobState
PARENT_FAILURE_POLICY_UNSPECIFIED: ParentFailurePolicy
PARENT_FAILURE_POLICY_FAIL: ParentFailurePolicy
PARENT_FAILURE_POLICY_IGNORE: ParentFailurePolicy

class JobResources(_message.Message):
    __slots__ = ("num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "gpus_per_rank", "node_packing_count", "wall_time_min", "launch_params")
    class LaunchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    RANKS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_CORE_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_PACKING_COUNT_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    num_nodes: int
    ranks_per_node: int
    threads_per_rank: int
    threads_per_core: int
    gpus_per_rank: int
    node_packing_count: int
    wall_time_min: int
    launch_params: _containers.ScalarMap[str, str]
    def __init__(self, num_nodes: _Optional[int] = ..., ranks_per_node: _Optional[int] = ..., threads_per_rank: _Optional[int] = ..., threads_per_core: _Optional[int] = ..., gpus_per_rank: _Optional[int] = ..., node_packing_count: _Optional[int] = ..., wall_time_min: _Optional[int] = ..., launch_params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobLease(_message.Message):
    __slots__ = ("session_id", "generation", "expire_time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "name", "app_id", "app_name", "site_id", "workdir", "tags", "parameters", "data", "parent_ids", "transfers", "resources", "priority", "state", "state_message", "return_code", "error_tail", "batch_job_id", "lease", "on_parent_failure", "run_count", "create_time", "update_time", "state_time")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TransfersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    APP_NAME_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PARENT_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETURN_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TAIL_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ON_PARENT_FAILURE_FIELD_NUMBER: _ClassVar[int]
    RUN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    app_id: int
    app_name: str
    site_id: int
    workdir: str
    tags: _containers.ScalarMap[str, str]
    parameters: _containers.ScalarMap[str, str]
    data: _struct_pb2.Struct
    parent_ids: _containers.RepeatedScalarFieldContainer[int]
    transfers: _containers.ScalarMap[str, str]
    resources: JobResources
    priority: int
    state: JobState
    state_message: str
    return_code: int
    error_tail: str
    batch_job_id: int
    lease: JobLease
    on_parent_failure: ParentFailurePolicy
    run_count: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    state_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., app_id: _Optional[int] = ..., app_name: _Optional[str] = ..., site_id: _Optional[int] = ..., workdir: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., parameters: _Optional[_Mapping[str, str]] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., parent_ids: _Optional[_Iterable[int]] = ..., transfers: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Union[JobResources, _Mapping]] = ..., priority: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., state_message: _Optional[str] = ..., return_code: _Optional[int] = ..., error_tail: _Optional[str] = ..., batch_job_id: _Optional[int] = ..., lease: _Optional[_Union[JobLease, _Mapping]] = ..., on_parent_failure: _Optional[_Union[ParentFailurePolicy, str]] = ..., run_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class JobFilter(_message.Message):
    __slots__ = ("ids", "states", "exclude_states", "tags", "app_ids", "app_names", "site_ids", "parent_ids", "workdir_contains", "create_time", "update_time", "batch_job_ids", "session_id", "exclude_tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ExcludeTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_STATES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    APP_IDS_FIELD_NUMBER: _ClassVar[int]
    APP_NAMES_FIELD_NUMBER: _ClassVar[int]
    SITE_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_TAGS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    exclude_states: _containers.RepeatedScalarFieldContainer[JobState]
    tags: _containers.ScalarMap[str, str]
    app_ids: _containers.RepeatedScalarFieldContainer[int]
    app_names: _containers.RepeatedScalarFieldContainer[str]
    site_ids: _containers.RepeatedScalarFieldContainer[int]
    parent_ids: _containers.RepeatedScalarFieldContainer[int]
    workdir_contains: str
    create_time: _common_pb2.TimeRange
    update_time: _common_pb2.TimeRange
    batch_job_ids: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    exclude_tags: _containers.ScalarMap[str, str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., exclude_states: _Optional[_Iterable[_Union[JobState, str]]] = ..., tags: _Optional[_Mapping[str, str]] = ..., app_ids: _Optional[_Iterable[int]] = ..., app_names: _Optional[_Iterable[str]] = ..., site_ids: _Optional[_Iterable[int]] = ..., parent_ids: _Optional[_Iterable[int]] = ..., workdir_contains: _Optional[str] = ..., create_time: _Optional[_Union[_common_pb2.TimeRange, _Mapping]] = ..., update_time: _Optional[_Union[_common_pb2.TimeRange, _Mapping]] = ..., batch_job_ids: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ..., exclude_tags: _Optional[_Mapping[str, str]] = ...) -> None: ...
