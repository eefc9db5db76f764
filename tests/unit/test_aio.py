"""core.aio.wait_event: a cancellation that arrives in the same turn of the loop as the
event is set still cancels the waiter (asyncio.wait_for on Python 3.11 drops it)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from balsam_grpc.core.aio import wait_event

PACKAGE = Path(__file__).resolve().parents[2] / "balsam_grpc"


async def _set_and_cancel(waiter) -> bool:  # type: ignore[no-untyped-def]
    """True when the waiting task was cancelled by a cancel sent as the event was set."""
    event = asyncio.Event()
    task = asyncio.create_task(waiter(event))
    await asyncio.sleep(0)  # the task waits now
    event.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


def test_cancel_as_the_event_is_set_cancels_the_waiter() -> None:
    assert asyncio.run(_set_and_cancel(lambda e: wait_event(e, 30))) is True


def test_wait_event_times_out_and_sees_a_set_event() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        late = await wait_event(event, 0.01)
        event.set()
        return late, await wait_event(event, 30)

    assert asyncio.run(main()) == (False, True)


def _wait_for_on_wait(path: Path) -> list[str]:
    """`asyncio.wait_for(<x>.wait(), ...)` calls in one file, as "file:line"."""
    text = path.read_text()
    if "wait_for" not in text:
        return []
    found = []
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "wait_for"
                and node.args and isinstance(node.args[0], ast.Call)
                and isinstance(node.args[0].func, ast.Attribute) and node.args[0].func.attr == "wait"):
            found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    return found


def test_nothing_waits_on_an_event_or_process_with_wait_for() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _wait_for_on_wait(path)]
    assert not found, f"use core.aio.wait_event instead of asyncio.wait_for(event.wait(), ...): {found}"


@pytest.mark.skipif(not hasattr(asyncio, "timeout") or __import__("sys").version_info >= (3, 12),
                    reason="the hazard is Python 3.11's wait_for")
def test_the_hazard_is_real_on_this_python() -> None:
    """The premise: wait_for loses the cancellation here (so the scan above matters)."""
    assert asyncio.run(_set_and_cancel(lambda e: asyncio.wait_for(e.wait(), 30))) is False
