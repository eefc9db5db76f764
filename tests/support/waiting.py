"""The one poll loop of the tests: wait, bounded in time, until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WAIT = 20.0  # the default bound (never reached when things work)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, *, interval: float = 0.05,
               on_timeout: Callable[[], str] | None = None) -> Any:
    """Call `predicate` every `interval` s until it returns a true value, and return that value.
    After `timeout` s (the predicate is called once more at the end), fail with an
    AssertionError naming `what`, followed by `on_timeout()` when given (a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)
