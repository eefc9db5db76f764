import datetime

from balsam_grpc.v1 import app_pb2 as _app_pb2
from balsam_grpc.v1 import batch_job_pb2 as _batch_job_pb2
from balsam_grpc.v1 import job_pb2 as _job_pb2
from balsam_grpc.v1 import site_pb2 as _site_pb2
from balsam_grpc.v1 import transfer_item_pb2 as _transfer_item_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HookKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOOK_KIND_UNSPECIFIED: _ClassVar[HookKind]
    HOOK_KIND_PREPROCESS: _ClassVar[HookKind]
    HOOK_KIND_POSTPROCESS: _ClassVar[HookKind]
    HOOK_KIND_HANDLE_ERROR: _ClassVar[HookKind]
    HOOK_KIND_HANDLE_TIMEOUT: _ClassVar[HookKind]
HOOK_KIND_UNSPECIFIED: HookKind
HOOK_KIND_PREPROCESS: HookKind
HOOK_KIND_POSTPROCESS: HookKind
HOOK_KIND_HANDLE_ERROR: HookKind
HOOK_KIND_HANDLE_TIMEOUT: HookKind

class SiteFilter(_message.Message):
    __slots__ = ("ids", "names", "connected")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    connected: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., names: _Optional[_Iterable[str]] = ..., connected: _Optional[bool] = ...) -> None: ...

class GetSiteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetSiteResponse(_message.Message):
    __slots__ = ("site",)
    SITE_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: SiteFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[SiteFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites", "next_page_token")
    SITES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[_site_pb2.Site]
    next_page_token: str
    def __init__(self, sites: _Optional[_Iterable[_Union[_site_pb2.Site, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateSiteRequest(_message.Message):
    __slots__ = ("site", "request_id")
    SITE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    request_id: str
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSiteResponse(_message.Message):
    __slots__ = ("site",)
    SITE_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ...) -> None: ...

class UpdateSiteRequest(_message.Message):
    __slots__ = ("site", "update_mask", "request_id")
    SITE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateSiteResponse(_message.Message):
    __slots__ = ("site",)
    SITE_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ...) -> None: ...

class DeleteSiteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class DeleteSiteResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class SiteHello(_message.Message):
    __slots__ = ("site_id", "hostname", "daemon_version", "capabilities", "max_in_flight")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    hostname: str
    daemon_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    max_in_flight: int
    def __init__(self, site_id: _Optional[int] = ..., hostname: _Optional[str] = ..., daemon_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class SiteCredit(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: int
    def __init__(self, items: _Optional[int] = ...) -> None: ...

class WorkAck(_message.Message):
    __slots__ = ("work_ids",)
    WORK_IDS_FIELD_NUMBER: _ClassVar[int]
    work_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, work_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchJobUpdate(_message.Message):
    __slots__ = ("batch_job_id", "state", "scheduler_id", "status_info", "start_time", "end_time")
    BATCH_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_INFO_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    batch_job_id: int
    state: _batch_job_pb2.BatchJobState
    scheduler_id: str
    status_info: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, batch_job_id: _Optional[int] = ..., state: _Optional[_Union[_batch_job_pb2.BatchJobState, str]] = ..., scheduler_id: _Optional[str] = ..., status_info: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HookResult(_message.Message):
    __slots__ = ("job_id", "hook", "next_state", "state_message", "job_changes", "job_mask", "new_jobs", "event_data")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    NEXT_STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_CHANGES_FIELD_NUMBER: _ClassVar[int]
    JOB_MASK_FIELD_NUMBER: _ClassVar[int]
    NEW_JOBS_FIELD_NUMBER: _ClassVar[int]
    EVENT_DATA_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    hook: HookKind
    next_state: _job_pb2.JobState
    state_message: str
    job_changes: _job_pb2.Job
    job_mask: _field_mask_pb2.FieldMask
    new_jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    event_data: _struct_pb2.Struct
    def __init__(self, job_id: _Optional[int] = ..., hook: _Optional[_Union[HookKind, str]] = ..., next_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., state_message: _Optional[str] = ..., job_changes: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., job_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., new_jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ..., event_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TransferUpdate(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_transfer_item_pb2.TransferItem]
    def __init__(self, items: _Optional[_Iterable[_Union[_transfer_item_pb2.TransferItem, _Mapping]]] = ...) -> None: ...

class CleanupResult(_message.Message):
    __slots__ = ("job_id", "removed_files", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FILES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    removed_files: int
    error: str
    def __init__(self, job_id: _Optional[int] = ..., removed_files: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("work_id", "batch_job", "hook", "transfers", "cleanup")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    batch_job: BatchJobUpdate
    hook: HookResult
    transfers: TransferUpdate
    cleanup: CleanupResult
    def __init__(self, work_id: _Optional[str] = ..., batch_job: _Optional[_Union[BatchJobUpdate, _Mapping]] = ..., hook: _Optional[_Union[HookResult, _Mapping]] = ..., transfers: _Optional[_Union[TransferUpdate, _Mapping]] = ..., cleanup: _Optional[_Union[CleanupResult, _Mapping]] = ...) -> None: ...

class SiteServiceConnectRequest(_message.Message):
    __slots__ = ("hello", "credit", "ack", "result", "snapshot")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    hello: SiteHello
    credit: SiteCredit
    ack: WorkAck
    result: WorkResult
    snapshot: _site_pb2.SchedulerSnapshot
    def __init__(self, hello: _Optional[_Union[SiteHello, _Mapping]] = ..., credit: _Optional[_Union[SiteCredit, _Mapping]] = ..., ack: _Optional[_Union[WorkAck, _Mapping]] = ..., result: _Optional[_Union[WorkResult, _Mapping]] = ..., snapshot: _Optional[_Union[_site_pb2.SchedulerSnapshot, _Mapping]] = ...) -> None: ...

class SiteWelcome(_message.Message):
    __slots__ = ("site", "server_version")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    site: _site_pb2.Site
    server_version: str
    def __init__(self, site: _Optional[_Union[_site_pb2.Site, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class SubmitBatchJob(_message.Message):
    __slots__ = ("batch_job",)
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ...) -> None: ...

class CancelBatchJob(_message.Message):
    __slots__ = ("batch_job",)
    BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    batch_job: _batch_job_pb2.BatchJob
    def __init__(self, batch_job: _Optional[_Union[_batch_job_pb2.BatchJob, _Mapping]] = ...) -> None: ...

class RunHook(_message.Message):
    __slots__ = ("job", "app", "hook")
    JOB_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    app: _app_pb2.App
    hook: HookKind
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ..., app: _Optional[_Union[_app_pb2.App, _Mapping]] = ..., hook: _Optional[_Union[HookKind, str]] = ...) -> None: ...

class StartTransfers(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_transfer_item_pb2.TransferItem]
    def __init__(self, items: _Optional[_Iterable[_Union[_transfer_item_pb2.TransferItem, _Mapping]]] = ...) -> None: ...

class CleanupJob(_message.Message):
    __slots__ = ("job_id", "workdir", "globs")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    GLOBS_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    workdir: str
    globs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[int] = ..., workdir: _Optional[str] = ..., globs: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("id", "attempt", "submit_batch_job", "cancel_batch_job", "run_hook", "start_transfers", "cleanup")
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    CANCEL_BATCH_JOB_FIELD_NUMBER: _ClassVar[int]
    RUN_HOOK_FIELD_NUMBER: _ClassVar[int]
    START_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_FIELD_NUMBER: _ClassVar[int]
    id: str
    attempt: int
    submit_batch_job: SubmitBatchJob
    cancel_batch_job: CancelBatchJob
    run_hook: RunHook
    start_transfers: StartTransfers
    cleanup: CleanupJob
    def __init__(self, id: _Optional[str] = ..., attempt: _Optional[int] = ..., submit_batch_job: _Optional[_Union[SubmitBatchJob, _Mapping]] = ..., cancel_batch_job: _Optional[_Union[CancelBatchJob, _Mapping]] = ..., run_hook: _Optional[_Union[RunHook, _Mapping]] = ..., start_transfers: _Optional[_Union[StartTransfers, _Mapping]] = ..., cleanup: _Optional[_Union[CleanupJob, _Mapping]] = ...) -> None: ...

class ResultAck(_message.Message):
    __slots__ = ("work_ids", "errors")
    WORK_IDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    work_ids: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, work_ids: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class SiteBacklog(_message.Message):
    __slots__ = ("runnable_jobs", "runnable_node_footprint", "max_job_nodes", "max_wall_time_min", "pending_jobs", "running_jobs", "active_sessions")
    RUNNABLE_JOBS_FIELD_NUMBER: _ClassVar[int]
    RUNNABLE_NODE_FOOTPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_WALL_TIME_MIN_FIELD_NUMBER: _ClassVar[int]
    PENDING_JOBS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    runnable_jobs: int
    runnable_node_footprint: float
    max_job_nodes: int
    max_wall_time_min: int
    pending_jobs: int
    running_jobs: int
    active_sessions: int
    def __init__(self, runnable_jobs: _Optional[int] = ..., runnable_node_footprint: _Optional[float] = ..., max_job_nodes: _Optional[int] = ..., max_wall_time_min: _Optional[int] = ..., pending_jobs: _Optional[int] = ..., running_jobs: _Optional[int] = ..., active_sessions: _Optional[int] = ...) -> None: ...

class SiteServiceConnectResponse(_message.Message):
    __slots__ = ("welcome", "work", "result_ack", "backlog")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    RESULT_ACK_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    welcome: SiteWelcome
    work: WorkItem
    result_ack: ResultAck
    backlog: SiteBacklog
    def __init__(self, welcome: _Optional[_Union[SiteWelcome, _Mapping]] = ..., work: _Optional[_Union[WorkItem, _Mapping]] = ..., result_ack: _Optional[_Union[ResultAck, _Mapping]] = ..., backlog: _Optional[_Union[SiteBacklog, _Mapping]] = ...) -> None: ...

class ListSiteStatisticsRequest(_message.Message):
    __slots__ = ("filter", "window_seconds")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    filter: SiteFilter
    window_seconds: float
    def __init__(self, filter: _Optional[_Union[SiteFilter, _Mapping]] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class SiteStatistics(_message.Message):
    __slots__ = ("site_id", "site_name", "connected", "backlog_jobs", "backlog_node_footprint", "runnable_jobs", "running_jobs", "running_node_footprint", "active_sessions", "held_nodes", "finished_in_window", "failed_in_window", "throughput_per_minute", "started_in_window", "queue_wait_mean_seconds", "queue_wait_p50_seconds", "finishing_jobs", "last_seen_time", "node_capacity")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_JOBS_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_NODE_FOOTPRINT_FIELD_NUMBER: _ClassVar[int]
    RUNNABLE_JOBS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_NODE_FOOTPRINT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HELD_NODES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    FAILED_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    STARTED_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISHING_JOBS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    site_name: str
    connected: bool
    backlog_jobs: int
    backlog_node_footprint: float
    runnable_jobs: int
    running_jobs: int
    running_node_footprint: float
    active_sessions: int
    held_nodes: int
    finished_in_window: int
    failed_in_window: int
    throughput_per_minute: float
    started_in_window: int
    queue_wait_mean_seconds: float
    queue_wait_p50_seconds: float
    finishing_jobs: int
    last_seen_time: _timestamp_pb2.Timestamp
    node_capacity: int
    def __init__(self, site_id: _Optional[int] = ..., site_name: _Optional[str] = ..., connected: _Optional[bool] = ..., backlog_jobs: _Optional[int] = ..., backlog_node_footprint: _Optional[float] = ..., runnable_jobs: _Optional[int] = ..., running_jobs: _Optional[int] = ..., running_node_footprint: _Optional[float] = ..., active_sessions: _Optional[int] = ..., held_nodes: _Optional[int] = ..., finished_in_window: _Optional[int] = ..., failed_in_window: _Optional[int] = ..., throughput_per_minute: _Optional[float] = ..., started_in_window: _Optional[int] = ..., queue_wait_mean_seconds: _Optional[float] = ..., queue_wait_p50_seconds: _Optional[float] = ..., finishing_jobs: _Optional[int] = ..., last_seen_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node_capacity: _Optional[int] = ...) -> None: ...

class ListSiteStatisticsResponse(_message.Message):
    __slots__ = ("sites", "time", "window_seconds")
    SITES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteStatistics]
    time: _timestamp_pb2.Timestamp
    window_seconds: float
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteStatistics, _Mapping]]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_seconds: _Optional[float] = ...) -> None: ...
