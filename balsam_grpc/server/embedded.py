"""A server running on a background thread's event loop, for synchronous callers:
tests, benchmarks and scripted demos."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from balsam_grpc.core.aio import new_event_loop
from balsam_grpc.server.app import BalsamServer
from balsam_grpc.server.state import ServerSettings


class LoopThread:
    """The server's event loop (core.aio.new_event_loop) on a daemon thread."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="balsam-server-loop")
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class EmbeddedServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.loop = LoopThread()
        self.server = BalsamServer(settings)
        self.port = self.loop.run(self.server.start())
        host = settings.address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    @property
    def db(self) -> Any:
        return self.server.db

    def stop(self, grace: float = 0.2) -> None:
        self.loop.run(self.server.stop(grace))
        self.loop.close()
