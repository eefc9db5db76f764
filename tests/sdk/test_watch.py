"""`watch()` and job futures across a server restart: a real server process on a fixed
port with a SQLite file is stopped and started again; changes are made while the watch
is still reconnecting; every event arrives exactly once and in order, compared with the
server's own event log."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from balsam_grpc.sdk import App, Client, Event, Site
from balsam_grpc.v1 import job_pb2

from tests.support.launcher import client_run_job
from tests.support.server_proc import ServerProcess

WAIT = 30


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'balsam.db'}")
    proc.start()
    yield proc
    proc.stop()


def connect(server: ServerProcess) -> Client:
    return Client(profile=server.profile_path, timeout=20)


def change(server: ServerProcess, job_id: int, *states: str, **fields: Any) -> None:
    """Move a job through states from a fresh connection (like another process would)."""
    with connect(server) as other:
        job = other.jobs.get(id=job_id)
        for state in states:
            job.state = state
            for name, value in fields.items():
                setattr(job, name, value)
            job.save()


def collect(stream: Any, into: queue.Queue[Event]) -> None:
    try:
        for event in stream:
            into.put(event)
    except Exception as exc:  # noqa: BLE001 - surfaced by the test through the queue
        into.put(exc)  # type: ignore[arg-type]


def take(q: queue.Queue[Event], n: int) -> list[Event]:
    out = []
    for _ in range(n):
        item = q.get(timeout=WAIT)
        assert isinstance(item, Event), item
        out.append(item)
    return out


def test_watch_and_futures_survive_server_restart(server: ServerProcess) -> None:
    client = connect(server)
    site = Site(_client=client, name="restart", hostname="h", path="/p").save()
    app = App(_client=client, site_id=site.id, name="echo", command_template="echo {{ w }}",
              parameters=[{"name": "w", "default_value": "x"}]).save()
    jobs = [app.submit(f"r/{i}") for i in range(4)]

    stream = client.watch(site=site.id)
    events: queue.Queue[Event] = queue.Queue()
    consumer = threading.Thread(target=collect, args=(stream, events), daemon=True)
    consumer.start()
    assert stream.wait_started(WAIT)
    first_cursor = stream.cursor

    # A future waiting across the restart, on the client's shared watcher.
    outcome: dict[str, Any] = {}
    client.watcher.track([jobs[1].id])
    waiter = threading.Thread(target=lambda: outcome.update(result=jobs[1].result(timeout=60)), daemon=True)
    waiter.start()

    change(server, jobs[0].id, "KILLED")
    before = take(events, 1)
    assert (before[0].job_id, before[0].to_state) == (jobs[0].id, "KILLED")

    server.stop()
    server.start()
    # The watch is still backing off: these happen while it is disconnected.
    data = struct_pb2.Struct()
    data.update({"result": "after restart"})
    with connect(server) as other:  # a launcher runs it
        client_run_job(other, jobs[1].id, job_pb2.JOB_STATE_RUN_DONE, data=data, return_code=0)
    change(server, jobs[2].id, "KILLED")
    with connect(server) as other:
        other.jobs.filter(id=jobs[3].id).update(state="KILLED")

    after = take(events, 4)  # RUNNING, JOB_FINISHED, KILLED, KILLED
    waiter.join(WAIT)
    stream.close()
    consumer.join(WAIT)

    received = before + after
    with connect(server) as other:
        log = [e for e in other.events.filter(site=site.id) if e.id > int(first_cursor)]
    assert [e.id for e in received] == [e.id for e in log]  # exactly once, in order, none missed
    assert [(e.job_id, e.to_state) for e in received] == [
        (jobs[0].id, "KILLED"), (jobs[1].id, "RUNNING"), (jobs[1].id, "JOB_FINISHED"),
        (jobs[2].id, "KILLED"), (jobs[3].id, "KILLED")]
    assert events.empty()
    assert stream.reconnects >= 1
    assert outcome.get("result") == "after restart"
    assert client.watcher.stream.reconnects >= 1
    client.close()


def test_watch_resumes_from_a_cursor(server: ServerProcess) -> None:
    with connect(server) as client:
        site = client.sites.create(name="cursor", hostname="h", path="/p")
        app = client.apps.create(site_id=site.id, name="echo", command_template="echo hi")
        job = app.submit("c/1")
        history = job.history()
        cursor = history[-1].cursor
        stream = client.watch(job=job.id, since_cursor=cursor)
        job.kill()
        event = next(stream)
        stream.close()
        assert (event.job_id, event.from_state, event.to_state) == (job.id, "PREPROCESSED", "KILLED")
        assert event.id > history[-1].id and stream.cursor == event.cursor
        replay = client.watch(job=job.id, replay=True)
        assert [next(replay).id for _ in range(len(history) + 1)] == [e.id for e in job.history()]
        replay.close()
