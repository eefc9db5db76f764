import datetime

from balsam_grpc.v1 import batch_job_pb2 as _batch_job_pb2
from balsam_grpc.v1 import job_pb2 as _job_pb2
from balsam_grpc.v1 import transfer_item_pb2 as _transfer_item_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStateChange(_message.Message):
    __slots__ = ("from_state", "to_state")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    from_state: _job_pb2.JobState
    to_state: _job_pb2.JobState
    def __init__(self, from_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., to_state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class TransferStateChange(_message.Message):
    __slots__ = ("transfer_item_id", "from_state", "to_state")
    TRANSFER_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    transfer_item_id: int
    from_state: _transfer_item_pb2.TransferState
    to_state: _transfer_item_pb2.TransferState
    def __init__(self, transfer_item_id: _Optional[int] = ..., from_state: _Optional[_Union[_transfer_item_pb2.TransferState, str]] = ..., to_state: _Optional[_Union[_transfer_item_pb2.TransferState, str]] = ...) -> None: ...

class BatchJobStateChange(_message.Message):
    __slots__ = ("batch_job_id", "from_state", "to_state")
    BATCH_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    batch_job_id: int
    from_state: _batch_job_pb2.BatchJobState
    to_state: _batch_job_pb2.BatchJobState
    def __init__(self, batch_job_id: _Optional[int] = ..., from_state: _Optional[_Union[_batch_job_pb2.BatchJobState, str]] = ..., to_state: _Optional[_Union[_batch_job_pb2.BatchJobState, str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "job_id", "site_id", "time", "job_state", "transfer_state", "batch_job_state", "data", "message", "receive_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_STATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    job_id: int
    site_id: int
    time: _timestamp_pb2.Timestamp
    job_state: JobStateChange
    transfer_state: TransferStateChange
    batch_job_state: BatchJobStateChange
    data: _struct_pb2.Struct
    message: str
    receive_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., job_id: _Optional[int] = ..., site_id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_state: _Optional[_Union[JobStateChange, _Mapping]] = ..., transfer_state: _Optional[_Union[TransferStateChange, _Mapping]] = ..., batch_job_state: _Optional[_Union[BatchJobStateChange, _Mapping]] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., message: _Optional[str] = ..., receive_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
