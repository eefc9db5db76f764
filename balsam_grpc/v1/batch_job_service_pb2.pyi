from balsam_grpc.v1 import batch_job_pb2 as _batch_job_pb2
from balsam_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchJobFilter(_message.Message):
    __slots__ = ("ids", "site_ids", "states", "queue", "scheduler_id", "create_time")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SITE_IDS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    site_ids: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[_batch_job_pb2.BatchJobState]
    queue: str
    scheduler_id: str
    create_time: _common_pb2.TimeRange
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., site_ids: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[_Union[_batch_job_pb2.BatchJobState, str]]] = ..., queue: _Optional[str] = ..., scheduler_id: _Optional[str] = ..., create_time: _Optional[_Union[_common_pb2.TimeRange, _Mapping]] = ...) -> None: ...

class GetBatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetBatchJobResponse(_message.Message):
    __slots__ = ("batch_job",)
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ...) -> None: ...

class ListBatchJobsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: BatchJobFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[BatchJobFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBatchJobsResponse(_message.Message):
    __slots__ = ("batch_jobs", "next_page_token")
    BATCH_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    batch_jobs: _containers.RepeatedCompositeFieldContainer[_batch_job_pb2.BatchJob]
    next_page_token: str
    def __init__(self, batch_jobs: _Optional[_Iterable[_Union[_batch_job_pb2.BatchJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateBatchJobRequest(_message.Message):
    __slots__ = ("batch_job", "request_id")
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    request_id: str
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateBatchJobResponse(_message.Message):
    __slots__ = ("batch_job",)
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ...) -> None: ...

class UpdateBatchJobRequest(_message.Message):
    __slots__ = ("batch_job", "update_mask", "request_id")
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateBatchJobResponse(_message.Message):
    __slots__ = ("batch_job",)
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ...) -> None: ...

class DeleteBatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class DeleteBatchJobResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...
