"""One shared reader of committed events that wakes only the streams they concern.

Before: every commit woke every site stream, launcher session and event watcher, and
each ran its own query to learn that nothing concerned it (with 150 streams, unary
throughput fell ~4x). Now one dispatcher task reads the new event rows once (the few
columns streams route on, in id order, in batches) and hands each row to the
subscriptions of its (owner, site), and to those of its owner that watch all sites.

Several server processes (replicas) may share one PostgreSQL database. Every transaction
that writes events notifies at commit with a hint of the (owner, site) pairs it wrote
(store/events.py); each replica listens on a connection of its own (server/notify.py),
and a hint that concerns a subscription here wakes the dispatcher (`hint`). Nothing
depends on a notification arriving: the dispatcher reads from its position, so a missed
one (a reconnect, which pokes it) costs latency, never an event.

Guarantees (no polling, nothing missed, order kept):
- The bus holds a horizon: every event with id <= it is committed or never will be. On
  SQLite (one writer, ids visible in commit order) a local commit's highest id is one.
  On PostgreSQL writers run concurrently, and the dispatcher asks the database
  (store/events.event_horizon) each time it is woken. It reads (position, horizon] and
  only then advances `position`. While writers are in flight above the horizon it asks
  again shortly (their commits notify too; an abort does not).
- A subscription is registered synchronously on the event loop. Rows routed after that
  reach it; rows up to `position` at that moment were committed before, so a stream that
  subscribes first and scans the database second misses nothing (at worst it is woken
  for something its scan already saw).
- A stream that must start from an older cursor passes `since`: if the dispatcher is
  already past it, the subscription starts with a gap, which tells the stream to read
  (since, upto] from the database itself. The same gap replaces the rows of a
  subscription whose consumer fell more than MAX_PENDING rows behind, so memory stays
  bounded however slow a stream is.
- Rows reach each subscription in id order.

A job's site never changes and a launcher only holds jobs of its session's site, so
(owner, site) routing also carries the kills of a session's held jobs.

Fast path (`runnable`): a create that committed runnable jobs on this replica tells the
subscriptions of their site at once, with the ids, before any notification or read (on
PostgreSQL those cost a NOTIFY round trip, the horizon query and the read of the rows,
about half of submit-to-RUNNING with an idle launcher). It only wakes earlier: the events
are routed as always, and other replicas learn of them as always.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, select

from balsam_grpc.core.aio import cancel_and_wait
from balsam_grpc.core.backoff import Backoff
from balsam_grpc.server.store.driver import driver_rows, driver_statement
from balsam_grpc.server.store.events import HORIZON, event_horizon, horizon_of, origin
from balsam_grpc.server.store.tables import events

log = structlog.get_logger("balsam.fanout")

# Event rows read per query by the dispatcher.
READ_BATCH = 5000
# Rows one subscription may hold before they are replaced by a gap (read from the database).
MAX_PENDING = 10_000
# After a failed read (database restart), the dispatcher retries after this long, doubling.
# Writers in flight below ids already drawn: look at the horizon again after this long,
# doubling (their commits notify as well; this covers an abort, which does not).
RECHECK_SECONDS = (0.005, 0.5)


@dataclass(frozen=True, slots=True)
class EventRow:
    """What streams route and decide on: no data, message or time."""

    id: int
    owner_id: int
    site_id: int | None
    job_id: int | None
    kind: str
    from_state: str
    to_state: str
    subject_id: int | None


_COLUMNS = (events.c.id, events.c.owner_id, events.c.site_id, events.c.job_id, events.c.kind,
            events.c.from_state, events.c.to_state, events.c.subject_id)


# Built once and run on the driver's cursor (store.driver): the dispatcher reads after
# every wake-up, and SQLAlchemy's execution cost more than SQLite took to run it.
_READ_EVENTS = (select(*_COLUMNS).where(events.c.id > bindparam("e_after"), events.c.id <= bindparam("e_upto"))
                .order_by(events.c.id).limit(bindparam("e_limit")))


def read_events(conn: Connection, after: int, upto: int, limit: int) -> list[EventRow]:
    """Events with after < id <= upto, in id order, at most `limit`."""
    rows = driver_rows(conn, driver_statement("fanout.read_events", lambda: _READ_EVENTS, conn.dialect),
                       {"e_after": after, "e_upto": upto, "e_limit": limit})
    return [EventRow(*r) for r in rows]


def read_horizon_and_events(conn: Connection, after: int, limit: int,
                            rows: bool) -> tuple[int, int, list[EventRow]]:
    """(horizon, last drawn id, events after `after` up to the horizon (when `rows`)): the
    dispatcher's wake-up work in one trip to the database thread pool and one connection
    (two trips cost a thread hand-off each, milliseconds on a busy machine)."""
    horizon, last = event_horizon(conn)
    return horizon, last, read_events(conn, after, horizon, limit) if rows and horizon > after else []


@dataclass(slots=True)
class Delivery:
    """What a subscription collected since its last take.

    rows: its events in id order. gap_after: when set, events after this id (up to
    `upto`) may be missing from `rows`: read them from the database. upto: every event
    with id <= upto has been routed (and is committed and visible)."""

    rows: list[EventRow]
    gap_after: int | None
    upto: int

    @property
    def empty(self) -> bool:
        return not self.rows and self.gap_after is None


@dataclass(eq=False)
class Subscription:
    """One stream's interest: an owner and its sites (None: all of them)."""

    fanout: Fanout
    owner_id: int
    site_ids: frozenset[int] | None
    on_wake: Callable[[], None] | None = None
    keep_rows: bool = True
    # Told the ids of jobs a create on this replica just committed runnable (Fanout.runnable).
    on_runnable: Callable[[Collection[int]], None] | None = None
    rows: list[EventRow] = field(default_factory=list)
    gap_after: int | None = None
    notified: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: int = 0  # rows routed to it in all (tests, diagnostics)
    after: int = 0  # rows up to here are not its business (its start)

    @property
    def pending(self) -> bool:
        """Something arrived that was not taken yet."""
        return self.notified.is_set()

    def take(self) -> Delivery:
        """Everything collected so far; the subscription starts afresh. Rows are routed
        synchronously, so nothing of interest up to the fanout's position is left out."""
        out = Delivery(self.rows, self.gap_after, self.fanout.position)
        self.rows = []
        self.gap_after = None
        self.notified.clear()
        return out

    async def wait(self, timeout: float | None = None) -> bool:
        """True once something arrived (now or before), False on timeout."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancellation (3.11)
                await self.notified.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.fanout.unsubscribe(self)

    def _deliver(self, rows: list[EventRow]) -> None:
        if rows[0].id <= self.after:
            rows = [r for r in rows if r.id > self.after]
            if not rows:
                return
        self.delivered += len(rows)
        if rows and self.keep_rows and self.gap_after is None:
            if len(self.rows) + len(rows) > MAX_PENDING:
                # Too far behind: forget the rows, the stream reads the range itself.
                self.gap_after = self.rows[0].id - 1 if self.rows else rows[0].id - 1
                self.rows = []
            else:
                self.rows.extend(rows)
        if not self.notified.is_set():
            self.notified.set()
            if self.on_wake is not None:
                self.on_wake()


class Fanout:
    """The registry of subscriptions and the dispatcher task that feeds them."""

    def __init__(self, db: Any, bus: Any, metrics: Any = None) -> None:
        self.db = db
        self.bus = bus
        self.metrics = metrics
        # Every committed event with id <= position has been routed.
        self.position = 0
        self.by_site: dict[tuple[int, int], list[Subscription]] = {}
        self.by_owner: dict[int, list[Subscription]] = {}
        self.count = 0
        self.reads = 0  # row reads run by the dispatcher (tests, diagnostics)
        self.hints = 0  # notifications from any replica (tests, diagnostics)
        self.own_hints = 0  # of them, this replica's own (skipped)
        engine = getattr(db, "engine", None)
        self.own_origin = origin(engine) if engine is not None and getattr(db, "is_postgres", False) else ""
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ registry

    def subscribe(self, owner_id: int, site_ids: Iterable[int] | None = None, *, since: int | None = None,
                  on_wake: Callable[[], None] | None = None, keep_rows: bool = True,
                  on_runnable: Callable[[Collection[int]], None] | None = None) -> Subscription:
        """Route events of `owner_id` (at `site_ids`, or at any site) to a new subscription.

        Events committed before this call are the caller's to read from the database. With
        `since`, it gets the events after that id: those the dispatcher already routed as a
        gap (the caller reads them), the others as rows."""
        self._ensure_running()
        sites = None if site_ids is None else frozenset(site_ids)
        sub = Subscription(self, owner_id, sites, on_wake, keep_rows, on_runnable, after=self.position)
        if since is not None:
            sub.after = since
            if since < self.position:
                sub.gap_after = since
                sub.notified.set()
        if sites is None:
            self.by_owner.setdefault(owner_id, []).append(sub)
        else:
            for site_id in sites:
                self.by_site.setdefault((owner_id, site_id), []).append(sub)
        if not self.bus.ordered_commits:
            # Commits that concerned no stream here did not wake the dispatcher (one-statement
            # creates, other replicas' commits), so `position` may lag the horizon: a watch
            # replaying up to it missed them until some later commit concerned it. One look
            # now routes them to this subscription like any new rows.
            self.bus.poke()
        self.count += 1
        return sub

    def concerns(self, pairs: Iterable[tuple[int, int]] | None) -> bool:
        """Would events of these (owner, site) pairs reach a subscription here (None: any)?"""
        if pairs is None:
            return self.count > 0
        return any((o, s) in self.by_site or o in self.by_owner for o, s in pairs)

    def runnable(self, owner_id: int, site_id: int, job_ids: Collection[int]) -> bool:
        """This replica just committed these jobs of (owner, site) runnable: tell that
        site's subscriptions now (the fast path; their events still come). True when
        one was told."""
        told = False
        for sub in self.by_site.get((owner_id, site_id), ()):
            if sub.on_runnable is not None:
                sub.on_runnable(job_ids)
                told = True
        return told

    def hint(self, pairs: Iterable[tuple[int, int]] | None, origin: str = "") -> None:
        """Another transaction (on any replica) committed events of these pairs: wake the
        dispatcher when they concern a subscription here. Others are read later, with the
        next batch that does. A hint from this replica's own pool (`origin`) is skipped:
        its commit already poked the bus (Database.write), and a second look would only
        read the horizon again."""
        self.hints += 1
        if origin and origin == self.own_origin:
            self.own_hints += 1
            return
        if self.concerns(pairs):
            self.bus.poke()

    async def start(self) -> None:
        """Learn the horizon now (streams opened before the first event take it as their
        start) and run the dispatcher."""
        horizon, _ = await self.db.read_now(event_horizon)
        self.bus.advance(horizon)
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            # Nothing routed is owed to anyone yet: start at the bus.
            self.position = max(self.position, self.bus.high_water)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="balsam-event-fanout")

    def unsubscribe(self, sub: Subscription) -> None:
        keys: list[tuple[dict[Any, list[Subscription]], Any]] = (
            [(self.by_owner, sub.owner_id)] if sub.site_ids is None
            else [(self.by_site, (sub.owner_id, s)) for s in sub.site_ids])
        removed = False
        for index, key in keys:
            subs = index.get(key)
            if subs is not None and sub in subs:
                subs.remove(sub)
                removed = True
                if not subs:
                    del index[key]
        if removed:
            self.count -= 1

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    # ------------------------------------------------------------------ dispatcher

    async def _run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        recheck: float | None = None  # seconds until the horizon is asked again, if due
        while True:
            await self.bus.wait_beyond(self.position, 3600.0 if recheck is None else recheck)
            try:
                if not self.bus.ordered_commits:
                    start = self.position
                    horizon, last, rows = await self._horizon_and_events(start, self.count > 0)
                    self.bus.advance(horizon)
                    recheck = None if horizon >= last else min(RECHECK_SECONDS[1], 2 * recheck) if recheck \
                        else RECHECK_SECONDS[0]
                    if self.count > 0 and horizon > start == self.position:  # the one dispatcher: nobody routed since
                        self._read(rows, horizon)
                high = self.bus.high_water
                if self.count == 0:
                    self.position = max(self.position, high)  # nobody to route to: no read
                while self.position < high:
                    self._read(await self.db.read_now(read_events, self.position, high, READ_BATCH), high)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the dispatcher must outlive a database outage
                delay = backoff.next_delay()
                log.exception("reading new events failed; retrying", position=self.position, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                self.bus.poke()

    async def _horizon_and_events(self, after: int, rows: bool) -> tuple[int, int, list[EventRow]]:
        """read_horizon_and_events. On PostgreSQL its two statements run on the event loop
        (Database.statement_now, each in autocommit as read_now runs them, the horizon
        first): no hop to a database thread and back, none of SQLAlchemy's per-execution
        work; the dispatcher wakes after most commits of a busy site."""
        if not getattr(self.db, "is_postgres", False):
            return await self.db.read_now(read_horizon_and_events, after, READ_BATCH, rows)
        dialect = self.db.engine.dialect
        horizon_sql = driver_statement("fanout.horizon", lambda: HORIZON, dialect).sql
        events_sql = driver_statement("fanout.read_events", lambda: _READ_EVENTS, dialect).sql
        horizon, last = horizon_of(*(await self.db.statement_now(horizon_sql, {}))[0])
        if not rows or horizon <= after:
            return horizon, last, []
        got = await self.db.statement_now(events_sql, {"e_after": after, "e_upto": horizon, "e_limit": READ_BATCH})
        return horizon, last, [EventRow(*r) for r in got]

    def _read(self, rows: list[EventRow], upto: int) -> None:
        """Route a batch read up to `upto` (a full batch: up to its last row)."""
        self.reads += 1
        if self.metrics is not None:
            self.metrics.events_read.inc(len(rows))
        self._route(rows, rows[-1].id if len(rows) == READ_BATCH else upto)

    def _route(self, rows: list[EventRow], upto: int) -> None:
        """Hand each row to the subscriptions it concerns (synchronously: no subscription
        can register between a batch's rows and the position that covers them)."""
        per_sub: dict[Subscription, list[EventRow]] = {}
        by_site, by_owner = self.by_site, self.by_owner
        for row in rows:
            for sub in by_site.get((row.owner_id, row.site_id), ()):  # type: ignore[arg-type]
                per_sub.setdefault(sub, []).append(row)
            for sub in by_owner.get(row.owner_id, ()):
                per_sub.setdefault(sub, []).append(row)
        self.position = upto
        for sub, mine in per_sub.items():
            sub._deliver(mine)
        if self.metrics is not None and per_sub:
            self.metrics.events_delivered.inc(sum(len(m) for m in per_sub.values()))
