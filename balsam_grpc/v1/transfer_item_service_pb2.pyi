from balsam_grpc.v1 import common_pb2 as _common_pb2
from balsam_grpc.v1 import transfer_item_pb2 as _transfer_item_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferItemFilter(_message.Message):
    __slots__ = ("ids", "job_ids", "site_ids", "states", "direction", "task_id")
    IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    SITE_IDS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    job_ids: _containers.RepeatedScalarFieldContainer[int]
    site_ids: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[_transfer_item_pb2.TransferState]
    direction: _common_pb2.TransferDirection
    task_id: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., job_ids: _Optional[_Iterable[int]] = ..., site_ids: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[_Union[_transfer_item_pb2.TransferState, str]]] = ..., direction: _Optional[_Union[_common_pb2.TransferDirection, str]] = ..., task_id: _Optional[str] = ...) -> None: ...

class GetTransferItemRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetTransferItemResponse(_message.Message):
    __slots__ = ("transfer_item",)
    TRANSFER_ITEM_FIELD_NUMBER: _ClassVar[int]
    transfer_item: _transfer_item_pb2.TransferItem
    def __init__(self, transfer_item: _Optional[_Union[_transfer_item_pb2.TransferItem, _Mapping]] = ...) -> None: ...

class ListTransferItemsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: TransferItemFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[TransferItemFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTransferItemsResponse(_message.Message):
    __slots__ = ("transfer_items", "next_page_token")
    TRANSFER_ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    transfer_items: _containers.RepeatedCompositeFieldContainer[_transfer_item_pb2.TransferItem]
    next_page_token: str
    def __init__(self, transfer_items: _Optional[_Iterable[_Union[_transfer_item_pb2.TransferItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateTransferItemRequest(_message.Message):
    __slots__ = ("transfer_item", "update_mask", "request_id")
    TRANSFER_ITEM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_item: _transfer_item_pb2.TransferItem
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, transfer_item: _Optional[_Union[_transfer_item_pb2.TransferItem, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateTransferItemResponse(_message.Message):
    __slots__ = ("transfer_item",)
    TRANSFER_ITEM_FIELD_NUMBER: _ClassVar[int]
    transfer_item: _transfer_item_pb2.TransferItem
    def __init__(self, transfer_item: _Optional[_Union[_transfer_item_pb2.TransferItem, _Mapping]] = ...) -> None: ...
