"""Python values that travel with a Python-function app's job: keyword arguments of any
picklable type (SDK -> launcher), the return value, and a raised exception (launcher ->
SDK), as cloudpickle in base64 under reserved keys of the job's `data`.

Pickles are made and read only by the job's owner (their SDK and their own launcher);
the server stores the text and never unpickles it. Each is limited to MAX_PICKLED_BYTES
so that, base64-encoded, it fits the server's per-job data limit (256 KiB) with room to
spare; larger values belong in files in the job's workdir.
"""

from __future__ import annotations

import base64
import json
from typing import Any

ARGS_KEY = "args_pickle"
RESULT_KEY = "result_pickle"
EXCEPTION_KEY = "exception_pickle"
# The readable copy of a result next to its pickle, when it is plain JSON and small.
RESULT_JSON_KEY = "result"
RESULT_JSON_MAX = 4096
MAX_PICKLED_BYTES = 180 * 1024


class ValueTooLarge(ValueError):
    """A value pickles to more than MAX_PICKLED_BYTES."""


def encode(value: Any, what: str, limit: int = MAX_PICKLED_BYTES) -> str:
    """`value` as base64 cloudpickle; ValueError naming `what` when it cannot be pickled or
    is larger than `limit` bytes pickled."""
    import cloudpickle

    try:
        raw = cloudpickle.dumps(value)
    except Exception as exc:  # pickling runs arbitrary __reduce__ code: any error can come out
        raise ValueError(f"{what} cannot be pickled: {type(exc).__name__}: {exc}") from exc
    if len(raw) > limit:
        raise ValueTooLarge(f"{what} is {len(raw) // 1024} KiB pickled, more than the {limit // 1024} KiB a job "
                            "carries: write it to a file in the job's workdir instead")
    return base64.b64encode(raw).decode("ascii")


def decode(text: str) -> Any:
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(text))


def readable(value: Any) -> Any:
    """A plain-JSON copy of a small result for people (`job show`, the dashboard), or None."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    if len(text) > RESULT_JSON_MAX or json.loads(text) != value:  # tuples and the like differ
        return None
    return value


class RemoteTraceback(Exception):
    """The traceback of an exception raised by a Python-function app in its launcher; it is
    the `__cause__` of the exception re-raised by `job.result()`."""

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.traceback_text.rstrip()}\n\"\"\""
