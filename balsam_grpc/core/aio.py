"""asyncio helpers shared by the server and its clients."""

from __future__ import annotations

import asyncio
import contextlib


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
