"""google.protobuf.Struct as Python data: the JSON it holds, with whole numbers as ints.

A Struct holds every number as a double, so the return code 3 the server records in an
event's data, or a job's {"n": 5}, read back as 3.0 and 5.0 (`range(job.data["n"])`
fails). Every reader (the SDK, balsamctl, an app's hooks, the dashboard) takes them
through here; the wire keeps doubles.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

# Whole doubles up to here are the integers they came from (2**53: every integer of
# this size or less has an exact double).
_EXACT_INT = 2.0**53


def whole_numbers(value: Any) -> Any:
    """JSON data read from a Struct with its whole numbers as ints."""
    if type(value) is float:
        return int(value) if value.is_integer() and -_EXACT_INT <= value <= _EXACT_INT else value
    if type(value) is dict:
        return {k: whole_numbers(v) for k, v in value.items()}
    if type(value) is list:
        return [whole_numbers(v) for v in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, whole numbers as ints (whole_numbers)."""
    return whole_numbers(json_format.MessageToDict(struct))  # type: ignore[no-any-return]
