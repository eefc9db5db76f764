"""This replica's clock, kept to the database's.

Replicas on different hosts stamp times (a job's create_time and state_time, events) and
compare them with times another replica wrote (a session's expire_time, kept ahead by the
heartbeat of the replica holding its stream, is reaped by any replica once it has
passed). On the hosts' own clocks a replica whose clock runs ahead expires live sessions
of the others early, and their jobs with them; and large creates (which take the
database's transaction time, store/jobs.py) and small ones would disagree. So every
replica reads the database's clock at start and every SYNC_SECONDS, and
convert.utcnow() adds the difference: all of them stamp and compare on one clock, to
within a round trip. SQLite is served by one process: its clock is the only one.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, text

from balsam_grpc.core.aio import cancel_and_wait
from balsam_grpc.server import convert
from balsam_grpc.server.store.db import Database

log = structlog.get_logger("balsam.server.clock")

SYNC_SECONDS = 60.0
SAMPLES = 3  # readings per sync; the one with the shortest round trip is kept
WARN_OFFSET = timedelta(seconds=1)

Reading = tuple[datetime, datetime, datetime]  # (local before, database, local after)


def offset_of(readings: list[Reading]) -> tuple[timedelta, timedelta]:
    """(database minus local, round trip) of the reading with the shortest round trip:
    the database read its clock somewhere inside it, most likely in the middle."""
    before, database, after = min(readings, key=lambda r: r[2] - r[0])
    return database - (before + (after - before) / 2), after - before


def read_clocks(conn: Connection, count: int) -> list[Reading]:
    readings = []
    for _ in range(count):
        before = convert._local_now()
        database = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
        readings.append((before, database, convert._local_now()))
    return readings


class DatabaseClock:
    def __init__(self, db: Database, every: float = SYNC_SECONDS) -> None:
        self.db = db
        self.every = every
        self._task: asyncio.Task[Any] | None = None
        self._warned = False

    async def start(self) -> None:
        """The first reading before anything is stamped; then one every `every` seconds."""
        if not self.db.is_postgres:
            return
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="balsam-database-clock")

    async def sync(self) -> timedelta:
        offset, round_trip = offset_of(await self.db.read_now(read_clocks, SAMPLES))
        convert.set_clock_offset(offset)
        far = abs(offset) > WARN_OFFSET
        if far and not self._warned:
            log.warning("this host's clock is off the database's; times are taken on the database's clock",
                        offset_ms=round(offset.total_seconds() * 1000, 1),
                        round_trip_ms=round(round_trip.total_seconds() * 1000, 2))
        self._warned = far
        return offset

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - the last offset stays; the next sync tries again
                log.warning("reading the database's clock failed", exc_info=True)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
