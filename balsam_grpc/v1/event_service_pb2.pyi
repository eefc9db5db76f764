from balsam_grpc.v1 import common_pb2 as _common_pb2
from balsam_grpc.v1 import event_pb2 as _event_pb2
from balsam_grpc.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_JOB_STATE: _ClassVar[EventKind]
    EVENT_KIND_TRANSFER_STATE: _ClassVar[EventKind]
    EVENT_KIND_BATCH_JOB_STATE: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_JOB_STATE: EventKind
EVENT_KIND_TRANSFER_STATE: EventKind
EVENT_KIND_BATCH_JOB_STATE: EventKind

class EventFilter(_message.Message):
    __slots__ = ("job_ids", "site_ids", "kinds", "to_states", "from_states", "tags", "time", "batch_job_ids")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    SITE_IDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TO_STATES_FIELD_NUMBER: _ClassVar[int]
    FROM_STATES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[int]
    site_ids: _containers.RepeatedScalarFieldContainer[int]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    to_states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    from_states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    tags: _containers.ScalarMap[str, str]
    time: _common_pb2.TimeRange
    batch_job_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, job_ids: _Optional[_Iterable[int]] = ..., site_ids: _Optional[_Iterable[int]] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., to_states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ..., from_states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ..., tags: _Optional[_Mapping[str, str]] = ..., time: _Optional[_Union[_common_pb2.TimeRange, _Mapping]] = ..., batch_job_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token", "descending")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    page_size: int
    page_token: str
    descending: bool
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., descending: _Optional[bool] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("filter", "cursor", "replay_from_start")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FROM_START_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    cursor: str
    replay_from_start: bool
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ..., cursor: _Optional[str] = ..., replay_from_start: _Optional[bool] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("events", "cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    cursor: str
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ..., cursor: _Optional[str] = ...) -> None: ...
