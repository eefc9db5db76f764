"""EventService: the event log, listed in pages or streamed live without gaps."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.core.validation import check_string_map
from balsam_grpc.server import paging
from balsam_grpc.server.convert import EnumCodec, dict_to_struct, from_timestamp, set_timestamp, shared_timestamp
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import stream, unary
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import events as store
from balsam_grpc.v1 import (
    batch_job_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    transfer_item_pb2,
)

JOB_STATES = EnumCodec(job_pb2.JobState, "JOB_STATE_")
TRANSFER_STATES = EnumCodec(transfer_item_pb2.TransferState, "TRANSFER_STATE_")
BATCH_JOB_STATES = EnumCodec(batch_job_pb2.BatchJobState, "BATCH_JOB_STATE_")
KINDS = EnumCodec(event_service_pb2.EventKind, "EVENT_KIND_")
WATCH_BATCH = 1000
HEARTBEAT_SECONDS = 15.0


_ID, _JOB, _SITE, _KIND, _SUBJECT, _FROM, _TO, _TIME, _RECEIVED, _DATA, _MESSAGE = (store.EVENT_COLUMN[name] for name in (
    "id", "job_id", "site_id", "kind", "subject_id", "from_state", "to_state", "time", "receive_time", "data",
    "message"))


def event_to_message(row: Any) -> event_pb2.Event:
    """One of store.list_events's rows as its message."""
    msg = event_pb2.Event(id=row[_ID], job_id=row[_JOB] or 0, site_id=row[_SITE] or 0, message=row[_MESSAGE] or "")
    set_timestamp(msg.time, row[_TIME])
    # The events of one transaction share their receive time: converted once.
    received = row[_RECEIVED]
    msg.receive_time.CopyFrom(msg.time if received is None else shared_timestamp(received))
    kind = row[_KIND]
    if kind == store.JOB_STATE:
        msg.job_state.from_state = JOB_STATES.number(row[_FROM])
        msg.job_state.to_state = JOB_STATES.number(row[_TO])
    elif kind == store.TRANSFER_STATE:
        msg.transfer_state.transfer_item_id = row[_SUBJECT] or 0
        msg.transfer_state.from_state = TRANSFER_STATES.number(row[_FROM])
        msg.transfer_state.to_state = TRANSFER_STATES.number(row[_TO])
    elif kind == store.BATCH_JOB_STATE:
        msg.batch_job_state.batch_job_id = row[_SUBJECT] or 0
        msg.batch_job_state.from_state = BATCH_JOB_STATES.number(row[_FROM])
        msg.batch_job_state.to_state = BATCH_JOB_STATES.number(row[_TO])
    dict_to_struct(row[_DATA], msg.data)
    return msg


def event_query(f: event_service_pb2.EventFilter, principal: Principal) -> store.EventQuery:
    # The job tag rules of JobFilter.tags (a '"' in a key broke SQLite's JSON path: INTERNAL).
    check_string_map(dict(f.tags), "filter.tags", max_entries=64, max_value_bytes=4096)
    site_ids = list(f.site_ids)
    if principal.is_site:
        if any(s != principal.site_id for s in site_ids):
            principal.check_site(next(s for s in site_ids if s != principal.site_id))
        site_ids = [principal.site_id]
    return store.EventQuery(
        owner_id=principal.user_id, job_ids=list(f.job_ids), site_ids=site_ids,
        kinds=[k.lower() for k in KINDS.names(f.kinds, "filter.kinds")],
        to_states=JOB_STATES.names(f.to_states, "filter.to_states"),
        from_states=JOB_STATES.names(f.from_states, "filter.from_states"), tags=dict(f.tags),
        batch_job_ids=list(f.batch_job_ids), time_start=from_timestamp(f.time.start, field="filter.time.start"),
        time_end=from_timestamp(f.time.end, field="filter.time.end"))


def _cursor(text: str) -> int:
    # ASCII digits within int64 only: str.isdigit() also accepts '²' (int() refuses it) and
    # any length (int() refuses 4300+ digits, the database anything past int64).
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) < 2**63):
        raise InvalidArgument(f"cursor {text[:40]!r} is not a cursor returned by WatchEvents", field="cursor")
    return int(text)


async def read_events(db: Any, q: store.EventQuery, *, after_id: int | None, limit: int, descending: bool = False,
                      upto: int | None = None) -> list[Any]:
    """store.list_events's rows: on PostgreSQL one statement on the event loop
    (store.list_events_statement), on SQLite through a database thread."""
    if db.is_postgres:
        return await db.statement_now(*store.list_events_statement(
            q, after_id=after_id, limit=limit, descending=descending, upto=upto))
    return await db.read(store.list_events, q, after_id=after_id, limit=limit, descending=descending, upto=upto)


class SharedReads:
    """Watchers with the same filter at the same cursor share one read (and one response
    message): one user's thousands of watchers cost one query per wake, not thousands."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.pending: dict[tuple[Any, ...], asyncio.Future[event_service_pb2.WatchEventsResponse | None]] = {}
        self.reads = 0  # queries run (tests, diagnostics)

    async def read(self, q: store.EventQuery, key: str, after: int, upto: int
                   ) -> event_service_pb2.WatchEventsResponse | None:
        k = (key, after, upto)
        shared = self.pending.get(k)
        if shared is None:
            shared = asyncio.ensure_future(self._read(q, after, upto))
            self.pending[k] = shared
            shared.add_done_callback(lambda _: self.pending.pop(k, None))
        # Shielded: one watcher going away must not cancel the read the others wait for.
        return await asyncio.shield(shared)

    async def _read(self, q: store.EventQuery, after: int, upto: int) -> event_service_pb2.WatchEventsResponse | None:
        self.reads += 1
        rows = await read_events(self.db, q, after_id=after, limit=WATCH_BATCH, upto=upto)
        if not rows:
            return None
        batch = [event_to_message(r) for r in rows]
        kept = paging.fitting(batch)  # cut by bytes too: the rest follow in the next message
        return event_service_pb2.WatchEventsResponse(events=batch[:kept], cursor=str(rows[kept - 1][_ID]))


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.db = state.db
        self.watch_reads = SharedReads(state.db)

    @unary(job_token=True)
    async def ListEvents(self, request, context, principal):  # noqa: N802
        q = event_query(request.filter, principal)
        size = paging.page_size(request.page_size, default=1000)
        fp = paging.fingerprint("ListEvents", principal.user_id,
                                request.filter.SerializeToString(deterministic=True).hex(), request.descending)
        after = paging.decode(request.page_token, fp)
        after_id = int(after[0]) if after else None
        rows = await read_events(self.db, q, after_id=after_id, limit=size + 1, descending=request.descending)
        events = [event_to_message(r) for r in rows[:size]]
        kept = paging.fitting(events)  # cut by bytes as well as by count
        response = event_service_pb2.ListEventsResponse(events=events[:kept])
        if len(rows) > kept:
            response.next_page_token = paging.encode(fp, [rows[kept - 1][_ID]])
        return response

    @stream(job_token=True)
    async def WatchEvents(self, request, context, principal):  # noqa: N802
        q = event_query(request.filter, principal)
        if request.cursor:
            cursor = _cursor(request.cursor)
        elif request.replay_from_start:
            cursor = 0
        else:
            cursor = await self.db.read(store.max_event_id, principal.user_id)
        # Woken only by events of this user (at the filter's sites), with their routing
        # rows: subscribed before the first read, so nothing committed after that read goes
        # unnoticed, and rows after `cursor` that came before are handed over as a gap.
        events = self.state.fanout.subscribe(principal.user_id, q.site_ids or None, since=cursor)
        key = repr(q)  # the whole selection, owner and (for a site's token) its site included
        # The log is read only up to where a routing row may match the filter (or could not
        # be seen: a gap): a watcher of final states is not woken into a query by every
        # RUNNING event. None: the filter needs the rows themselves (tags, times).
        may_match = store.routing_match(q)
        read_upto = 0
        try:
            yield event_service_pb2.WatchEventsResponse(cursor=str(cursor))
            while True:
                # Every event up to `seen` is committed or never will be (the horizon): none
                # can appear later below a cursor this stream already gave out.
                delivery = events.take()
                seen = delivery.upto
                if delivery.gap_after is not None or may_match is None or any(map(may_match, delivery.rows)):
                    read_upto = max(read_upto, seen)
                batch = await self.watch_reads.read(q, key, cursor, seen) \
                    if seen > cursor and read_upto > cursor else None
                if batch is not None:
                    cursor = int(batch.cursor)
                    yield batch
                    continue
                # Events of other users or other filters also advance the global position.
                cursor = max(cursor, seen)
                # Spread over +-20%: thousands of watchers opened together must not all
                # send their heartbeat in the same instant, every period, ahead of others' calls.
                if not await events.wait(HEARTBEAT_SECONDS * random.uniform(0.8, 1.2)):  # noqa: S311
                    yield event_service_pb2.WatchEventsResponse(cursor=str(cursor))
        finally:
            events.close()
