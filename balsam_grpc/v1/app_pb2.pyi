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

class ParameterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETER_TYPE_UNSPECIFIED: _ClassVar[ParameterType]
    PARAMETER_TYPE_STRING: _ClassVar[ParameterType]
    PARAMETER_TYPE_INT: _ClassVar[ParameterType]
    PARAMETER_TYPE_FLOAT: _ClassVar[ParameterType]
    PARAMETER_TYPE_BOOL: _ClassVar[ParameterType]
    PARAMETER_TYPE_PATH: _ClassVar[ParameterType]

class RetryAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRY_ACTION_UNSPECIFIED: _ClassVar[RetryAction]
    RETRY_ACTION_RESTART: _ClassVar[RetryAction]
    RETRY_ACTION_FAIL: _ClassVar[RetryAction]

class AppKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APP_KIND_UNSPECIFIED: _ClassVar[AppKind]
    APP_KIND_SHELL: _ClassVar[AppKind]
    APP_KIND_PYTHON: _ClassVar[AppKind]
PARAMETER_TYPE_UNSPECIFIED: ParameterType
PARAMETER_TYPE_STRING: ParameterType
PARAMETER_TYPE_INT: ParameterType
PARAMETER_TYPE_FLOAT: ParameterType
PARAMETER_TYPE_BOOL: ParameterType
PARAMETER_TYPE_PATH: ParameterType
RETRY_ACTION_UNSPECIFIED: RetryAction
RETRY_ACTION_RESTART: RetryAction
RETRY_ACTION_FAIL: RetryAction
APP_KIND_UNSPECIFIED: AppKind
APP_KIND_SHELL: AppKind
APP_KIND_PYTHON: AppKind

class AppParameter(_message.Message):
    __slots__ = ("name", "required", "default_value", "help", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    required: bool
    default_value: str
    help: str
    type: ParameterType
    def __init__(self, name: _Optional[str] = ..., required: _Optional[bool] = ..., default_value: _Optional[str] = ..., help: _Optional[str] = ..., type: _Optional[_Union[ParameterType, str]] = ...) -> None: ...

class TransferSlot(_message.Message):
    __slots__ = ("name", "direction", "local_path", "required", "recursive", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    direction: _common_pb2.TransferDirection
    local_path: str
    required: bool
    recursive: bool
    description: str
    def __init__(self, name: _Optional[str] = ..., direction: _Optional[_Union[_common_pb2.TransferDirection, str]] = ..., local_path: _Optional[str] = ..., required: _Optional[bool] = ..., recursive: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_retries", "quick_failure_seconds", "on_error", "on_timeout")
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    QUICK_FAILURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    ON_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    max_retries: int
    quick_failure_seconds: int
    on_error: RetryAction
    on_timeout: RetryAction
    def __init__(self, max_retries: _Optional[int] = ..., quick_failure_seconds: _Optional[int] = ..., on_error: _Optional[_Union[RetryAction, str]] = ..., on_timeout: _Optional[_Union[RetryAction, str]] = ...) -> None: ...

class AppHooks(_message.Message):
    __slots__ = ("preprocess", "postprocess", "handle_error", "handle_timeout")
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_ERROR_FIELD_NUMBER: _ClassVar[int]
    HANDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    preprocess: bool
    postprocess: bool
    handle_error: bool
    handle_timeout: bool
    def __init__(self, preprocess: _Optional[bool] = ..., postprocess: _Optional[bool] = ..., handle_error: _Optional[bool] = ..., handle_timeout: _Optional[bool] = ...) -> None: ...

class App(_message.Message):
    __slots__ = ("id", "site_id", "name", "description", "command_template", "parameters", "transfers", "environment", "preamble", "cleanup_globs", "retry_policy", "hooks", "kind", "class_path", "create_time", "update_time", "shell")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PREAMBLE_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_GLOBS_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLASS_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SHELL_FIELD_NUMBER: _ClassVar[int]
    id: int
    site_id: int
    name: str
    description: str
    command_template: str
    parameters: _containers.RepeatedCompositeFieldContainer[AppParameter]
    transfers: _containers.RepeatedCompositeFieldContainer[TransferSlot]
    environment: _containers.ScalarMap[str, str]
    preamble: str
    cleanup_globs: _containers.RepeatedScalarFieldContainer[str]
    retry_policy: RetryPolicy
    hooks: AppHooks
    kind: AppKind
    class_path: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    shell: bool
    def __init__(self, id: _Optional[int] = ..., site_id: _Optional[int] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., command_template: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[AppParameter, _Mapping]]] = ..., transfers: _Optional[_Iterable[_Union[TransferSlot, _Mapping]]] = ..., environment: _Optional[_Mapping[str, str]] = ..., preamble: _Optional[str] = ..., cleanup_globs: _Optional[_Iterable[str]] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., hooks: _Optional[_Union[AppHooks, _Mapping]] = ..., kind: _Optional[_Union[AppKind, str]] = ..., class_path: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shell: _Optional[bool] = ...) -> None: ...
