"""Fixtures of the security tests (helpers live in seckit.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from seckit import StreamClient


@pytest.fixture
def streams() -> Iterator[list[StreamClient]]:
    opened: list[StreamClient] = []
    yield opened
    for s in opened:
        s.close()
