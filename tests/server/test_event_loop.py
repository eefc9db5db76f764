"""The server's event loop (core.aio.new_event_loop): uvloop's, which the `server` extra
installs; asyncio's with BALSAM_EVENT_LOOP=asyncio or where uvloop is missing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from balsam_grpc.core import aio
from tests.support.server_proc import ServerProcess
from tests.support.waiting import wait_until


def _started_on(server: ServerProcess) -> str:
    lines = [json.loads(line) for line in server.log_tail(100_000).splitlines() if '"server started"' in line]
    assert len(lines) == 1, server.log_tail()
    return str(lines[0]["event_loop"])


@pytest.mark.parametrize("choice, module", [(None, "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_the_server_process_runs_and_answers_on_the_chosen_loop(tmp_path: Path, choice: str | None,
                                                                 module: str) -> None:
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'balsam.db'}",
                           extra_env={aio.EVENT_LOOP_ENV: choice} if choice else None)
    server.start()
    try:
        with server.client() as client:
            site = client.sites.create(name="loop", hostname="h", path="/tmp/loop")
            assert client.sites.get(id=site.id).name == "loop"
        wait_until(lambda: '"server started"' in server.log_tail(100_000), "the start logged", timeout=10)
        assert _started_on(server) == module
    finally:
        server.stop()


def test_without_uvloop_the_loop_is_asyncios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.EVENT_LOOP_ENV, raising=False)
    loop = aio.new_event_loop()
    try:
        assert type(loop).__module__ == "uvloop"
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails, as where it is not installed
    assert aio.run(asyncio.sleep(0, result="done")) == "done"
    loop = aio.new_event_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()
