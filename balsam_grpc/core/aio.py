"""asyncio helpers shared by the server and its clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# BALSAM_EVENT_LOOP=asyncio runs on asyncio's own loop even where uvloop is installed
# (asyncio's debug mode; comparing the two).
EVENT_LOOP_ENV = "BALSAM_EVENT_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (the `server` extra brings it), else
    asyncio's. A unary call's fixed cost is mostly the loop's (gRPC's completion callbacks,
    the handler's task, socket waits): callgrind, PostgreSQL, 16 concurrent clients, server
    instructions per call with asyncio's loop and uvloop's: health check 468 and 335 kIr,
    CreateJob 956 and 786, GetJob 758 and 584 (scripts/bench_instructions.py --concurrency)."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # not installed (a platform without its wheel)
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on new_event_loop's loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds pass (False).

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that returns normally
    when the waiting task is cancelled in the same turn of the loop as the event is set,
    and the cancellation is lost. A server stopping then waits for a stream loop that
    went on running (it hung server stop once)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel the tasks (None: none was started) and wait until each has ended; their
    CancelledError is theirs, not the caller's."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
