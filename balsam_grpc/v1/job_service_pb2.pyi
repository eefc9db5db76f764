from balsam_grpc.v1 import common_pb2 as _common_pb2
from balsam_grpc.v1 import job_pb2 as _job_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_VIEW_UNSPECIFIED: _ClassVar[JobView]
    JOB_VIEW_BASIC: _ClassVar[JobView]
    JOB_VIEW_FULL: _ClassVar[JobView]

class JobGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_GROUP_BY_UNSPECIFIED: _ClassVar[JobGroupBy]
    JOB_GROUP_BY_STATE: _ClassVar[JobGroupBy]
    JOB_GROUP_BY_SITE: _ClassVar[JobGroupBy]
    JOB_GROUP_BY_APP: _ClassVar[JobGroupBy]
JOB_VIEW_UNSPECIFIED: JobView
JOB_VIEW_BASIC: JobView
JOB_VIEW_FULL: JobView
JOB_GROUP_BY_UNSPECIFIED: JobGroupBy
JOB_GROUP_BY_STATE: JobGroupBy
JOB_GROUP_BY_SITE: JobGroupBy
JOB_GROUP_BY_APP: JobGroupBy

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token", "order_by", "view")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    filter: _job_pb2.JobFilter
    page_size: int
    page_token: str
    order_by: str
    view: JobView
    def __init__(self, filter: _Optional[_Union[_job_pb2.JobFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., order_by: _Optional[str] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CountJobsRequest(_message.Message):
    __slots__ = ("filter", "group_by")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    filter: _job_pb2.JobFilter
    group_by: _containers.RepeatedScalarFieldContainer[JobGroupBy]
    def __init__(self, filter: _Optional[_Union[_job_pb2.JobFilter, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[JobGroupBy, str]]] = ...) -> None: ...

class JobCount(_message.Message):
    __slots__ = ("state", "site_id", "app_id", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    site_id: int
    app_id: int
    count: int
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ..., site_id: _Optional[int] = ..., app_id: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class CountJobsResponse(_message.Message):
    __slots__ = ("total", "groups")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    total: int
    groups: _containers.RepeatedCompositeFieldContainer[JobCount]
    def __init__(self, total: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[JobCount, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job", "request_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    request_id: str
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class BatchCreateJobsRequest(_message.Message):
    __slots__ = ("jobs", "request_id", "view")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    request_id: str
    view: JobView
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ..., request_id: _Optional[str] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class BatchCreateJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ...) -> None: ...

class UpdateJobRequest(_message.Message):
    __slots__ = ("job", "update_mask", "request_id", "event_data")
    JOB_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_DATA_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    event_data: _struct_pb2.Struct
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ..., event_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class UpdateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class BatchUpdateJobsRequest(_message.Message):
    __slots__ = ("filter", "patch", "update_mask", "request_id", "validate_only", "event_data")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    EVENT_DATA_FIELD_NUMBER: _ClassVar[int]
    filter: _job_pb2.JobFilter
    patch: _job_pb2.Job
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    validate_only: bool
    event_data: _struct_pb2.Struct
    def __init__(self, filter: _Optional[_Union[_job_pb2.JobFilter, _Mapping]] = ..., patch: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ..., validate_only: _Optional[bool] = ..., event_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class BatchUpdateJobsResponse(_message.Message):
    __slots__ = ("outcomes", "updated_count", "failed_count")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_COUNT_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.ItemOutcome]
    updated_count: int
    failed_count: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[_common_pb2.ItemOutcome, _Mapping]]] = ..., updated_count: _Optional[int] = ..., failed_count: _Optional[int] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("id", "request_id", "cascade")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    id: int
    request_id: str
    cascade: bool
    def __init__(self, id: _Optional[int] = ..., request_id: _Optional[str] = ..., cascade: _Optional[bool] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class BatchDeleteJobsRequest(_message.Message):
    __slots__ = ("filter", "request_id", "validate_only", "cascade")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    filter: _job_pb2.JobFilter
    request_id: str
    validate_only: bool
    cascade: bool
    def __init__(self, filter: _Optional[_Union[_job_pb2.JobFilter, _Mapping]] = ..., request_id: _Optional[str] = ..., validate_only: _Optional[bool] = ..., cascade: _Optional[bool] = ...) -> None: ...

class BatchDeleteJobsResponse(_message.Message):
    __slots__ = ("outcomes", "deleted_count", "failed_count")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_COUNT_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.ItemOutcome]
    deleted_count: int
    failed_count: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[_common_pb2.ItemOutcome, _Mapping]]] = ..., deleted_count: _Optional[int] = ..., failed_count: _Optional[int] = ...) -> None: ...

class RetryJobsRequest(_message.Message):
    __slots__ = ("filter", "request_id", "validate_only", "reset_run_count")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    RESET_RUN_COUNT_FIELD_NUMBER: _ClassVar[int]
    filter: _job_pb2.JobFilter
    request_id: str
    validate_only: bool
    reset_run_count: bool
    def __init__(self, filter: _Optional[_Union[_job_pb2.JobFilter, _Mapping]] = ..., request_id: _Optional[str] = ..., validate_only: _Optional[bool] = ..., reset_run_count: _Optional[bool] = ...) -> None: ...

class RetryJobsResponse(_message.Message):
    __slots__ = ("outcomes", "retried_count", "failed_count")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    RETRIED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_COUNT_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.ItemOutcome]
    retried_count: int
    failed_count: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[_common_pb2.ItemOutcome, _Mapping]]] = ..., retried_count: _Optional[int] = ..., failed_count: _Optional[int] = ...) -> None: ...
