"""Several server replicas on one PostgreSQL database (issue 14).

- Three replicas: the site daemon on one, a launcher on another, a watcher on the third,
  jobs created through all three. Every job (a file:// stage-in its run reads, a
  postprocess hook, a file:// stage-out of what it wrote) finishes once with each step
  once and in order, the watcher sees every event once and in order, a kill made on one
  replica reaches the job running under another, and a hook made due on one is offered
  by another. Before, each replica woke only on its own commits: hooks waited for an
  unrelated write through the daemon's replica and kills for one through the launcher's.
- kill -9 of the replica that holds the daemon's and the launcher's streams under load
  (they were given all three addresses): both move to the others, the session is
  resumed within one lease timeout, nothing is lost and nothing runs twice.
- Drain (SIGTERM) of the replica that holds them and an SDK watch: it ends their streams
  with UNAVAILABLE DRAINING, all reconnect to the other replica at once (no backoff), the
  session is resumed (not reaped), nothing is lost and nothing runs twice, and the watch
  sees every event once and in order.

PostgreSQL only: SQLite serves one process (a second server on it is refused, see
tests/server/test_replica_guard.py).
"""

from __future__ import annotations

import json
import secrets
import signal
import statistics
import time
from pathlib import Path

import psutil
import pytest

from balsam_grpc.sdk import Client, Job
from balsam_grpc.v1 import event_service_pb2, job_pb2, job_service_pb2, session_pb2, transfer_item_pb2
from balsam_grpc.v1 import transfer_item_service_pb2
from tests.conftest import POSTGRES_URL
from tests.faults.conftest import database_url
from tests.faults.harness import (
    LauncherProc,
    ServerProc,
    SiteProc,
    Watcher,
    audit,
    create_jobs,
    job_events,
    last_event_id,
    passed_through,
    states,
    wait_states,
)
from tests.faults.report import record
from tests.support.databases import drop_postgres
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not POSTGRES_URL, reason="replicas share a PostgreSQL database")]
J = job_pb2
T = transfer_item_pb2

# Hooked (tests/faults/harness.py) with data staging: the run reads its staged-in input
# and writes an output (the input and its job id) that is staged out after the hook.
STAGED_APP = """

class Staged(Hooked):
    command_template = ("/bin/sh -c 'echo start $BALSAM_JOB_ID >> {ledger}; cat in.dat > out.dat; "
                        "echo $BALSAM_JOB_ID >> out.dat; echo end $BALSAM_JOB_ID >> {ledger}'")
    transfers = {{"inp": {{"direction": "in", "local_path": "in.dat", "required": True}},
                 "out": {{"direction": "out", "local_path": "out.dat"}}}}
"""
# One job's steps in the order their events must come (by event id).
STAGED_STEPS = ("STAGED_IN", "RUNNING", "RUN_DONE", "POSTPROCESSED", "STAGED_OUT", "JOB_FINISHED")
PAYLOAD = "staged input\n"


def _replicas(tmp: Path, n: int, start: int | None = None) -> list[ServerProc]:
    url = database_url("postgres", tmp)
    servers = [ServerProc(tmp / f"replica-{i}", url) for i in range(n)]
    for s in servers[: n if start is None else start]:
        s.start()  # one after the other: the first runs the migrations
    return servers


def _staged_site(tmp: Path, server: ServerProc, **changes: object) -> SiteProc:
    """A site whose apps include Staged, with file:// locations `src` (holding in.dat) and
    `dst`, and a transfer service that starts and polls its copies without delay."""
    for name in ("src", "dst"):
        (tmp / name).mkdir()
    (tmp / "src" / "in.dat").write_text(PAYLOAD)
    site = SiteProc(tmp, server, transfer_locations={"src": f"file://{tmp / 'src'}", "dst": f"file://{tmp / 'dst'}"},
                    transfers__batch_linger_s=0.05, transfers__poll_seconds=0.2, **changes)
    apps = site.dir / "apps" / "apps.py"
    apps.write_text(apps.read_text() + STAGED_APP.format(ledger=str(site.ledger)))
    return site


def _create_staged(client: Client, n: int, prefix: str, site_id: int) -> list[int]:
    """n Staged jobs in one call, each staging its output to dst:/<its workdir>/out.dat."""
    jobs = []
    for i in range(n):
        workdir = f"{prefix}/{i}-{secrets.token_hex(3)}"
        jobs.append(Job(_client=client, workdir=workdir, app_name="Staged", site_id=site_id,
                        transfers={"inp": "src:/in.dat", "out": f"dst:/{workdir}/out.dat"}))
    return [j.id for j in client.jobs.bulk_create(jobs)]


def _check_staging(client: Client, tmp: Path, ids: list[int]) -> None:
    """Every job's transfer items are DONE, each reached DONE once, its steps came once
    each and in order, and its staged-out output is what its run wrote."""
    resp = client.stub("TransferService").ListTransferItems(transfer_item_service_pb2.ListTransferItemsRequest(
        filter=transfer_item_service_pb2.TransferItemFilter(job_ids=ids), page_size=1000),
        metadata=client.metadata, timeout=30)
    items = {(i.job_id, i.slot): i for i in resp.transfer_items}
    assert set(items) == {(j, slot) for j in ids for slot in ("inp", "out")}
    assert {T.TransferState.Name(i.state) for i in items.values()} == {"TRANSFER_STATE_DONE"}
    by_job: dict[int, list] = {j: [] for j in ids}
    for e in job_events(client, ids):
        by_job[e.job_id].append(e)
    for job_id, evs in by_job.items():
        done = [e.transfer_state.transfer_item_id for e in evs if e.WhichOneof("change") == "transfer_state"
                and e.transfer_state.to_state == T.TRANSFER_STATE_DONE]
        assert sorted(done) == sorted(i.id for (j, _), i in items.items() if j == job_id), f"job {job_id}: {done}"
        steps = [s for e in sorted(evs, key=lambda e: e.id) for s in STAGED_STEPS if passed_through(e, s)]
        assert steps == list(STAGED_STEPS), f"job {job_id}: steps {steps}"
    jobs = {j.id: j for j in client.jobs.filter(id=ids)}
    for job_id in ids:
        assert (tmp / "dst" / jobs[job_id].workdir / "out.dat").read_text() == f"{PAYLOAD}{job_id}\n"


def _sleeper(marker: str) -> psutil.Process | None:
    """The `sleep <marker>` process a Nap job runs."""
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] == ["sleep", marker]:
            return p
    return None


def _event_times(client: Client, ids: list[int], state: str) -> dict[int, float]:
    """Job id -> time of the event that moved it into (or through) `state`."""
    return {e.job_id: e.time.ToNanoseconds() / 1e9 for e in job_events(client, ids) if passed_through(e, state)}


def _kill(client: Client, job_id: int) -> None:
    from google.protobuf import field_mask_pb2

    job = J.Job(id=job_id, state=J.JOB_STATE_KILLED)
    client.stub("JobService").UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job, update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=client.metadata, timeout=30)


def _ended(proc: psutil.Process) -> bool:
    """Gone or a zombie. It may be reaped between is_running() and status(): that is gone
    too, not NoSuchProcess out of the wait."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_three_replicas_site_launcher_and_watcher_on_different_replicas(tmp_path: Path) -> None:
    a, b, c = _replicas(tmp_path, 3)
    site = _staged_site(tmp_path, a, elastic_queue__enabled=False)
    clients: list[Client] = []
    launcher = None
    try:
        clients = [s.client() for s in (a, b, c)]
        site.start()  # its daemon on A
        launcher = LauncherProc(site.dir, a, address=b.address)  # the launcher on B
        watcher = Watcher(clients[2], site.id)  # the watcher on C
        ids: list[int] = []
        for i, client in enumerate(clients):
            ids += _create_staged(client, 2, f"via-{i}", site.id)
        wait_states(clients[0], ids, "JOB_FINISHED", 90, debug=lambda: site.log_tail() + launcher.text()[-2000:])

        # A kill made on C reaches the job running under the launcher on B.
        marker = f"{300 + secrets.randbelow(10_000) / 1000:.3f}"
        (victim,) = create_jobs(clients[0], 1, "kill", app_name="Nap", site_id=site.id, parameters={"secs": marker})
        proc = wait_until(lambda: _sleeper(marker), "the job's process to start", 60, interval=0.05)
        _kill(clients[2], victim)
        killed_at = time.monotonic()
        wait_until(lambda: _ended(proc),
                   "the kill to reach the job's process", 30, interval=0.01)
        kill_latency = time.monotonic() - killed_at

        # One job alone (no queue in front of its hook): created on C, leased through B,
        # its hook offered to the daemon on A. The hook's own process start is included.
        (lone,) = create_jobs(clients[2], 1, "lone", app_name="Hooked", site_id=site.id)
        wait_states(clients[0], [lone], "JOB_FINISHED", 60, debug=site.log_tail)
        result = audit(clients[0], ids + [lone], site.ledger, hook_ledger=site.hook_ledger)
        created = {lone: min(e.time.ToNanoseconds() / 1e9 for e in job_events(clients[0], [lone]))}
        running = _event_times(clients[0], [lone], "RUNNING")
        done = _event_times(clients[0], ids + [lone], "RUN_DONE")
        post = _event_times(clients[0], ids + [lone], "POSTPROCESSED")
        hook_latency = sorted(post[j] - done[j] for j in ids if j in done and j in post)
        print(f"\nthree replicas: {len(ids)} jobs (stage-in, run, hook, stage-out) at once, RUN_DONE "
              f"(launcher on B) -> POSTPROCESSED (daemon on A, 2 hook processes at a time) "
              f"p50 {statistics.median(hook_latency) * 1000:.0f} ms; "
              f"one job alone: created on C -> RUNNING through B {(running[lone] - created[lone]) * 1000:.0f} ms, "
              f"RUN_DONE -> POSTPROCESSED by A {(post[lone] - done[lone]) * 1000:.0f} ms; "
              f"kill on C -> job process gone under B: {kill_latency * 1000:.0f} ms")
        result.assert_clean()
        assert len(hook_latency) == len(ids)
        _check_staging(clients[0], tmp_path, ids)
        assert watcher.check(clients[2]) > 0
        assert states(clients[0], [victim]) == {"KILLED": 1}
    finally:
        if launcher is not None:
            launcher.stop()
        site.stop()
        for client in clients:
            client.close()
        for s in (a, b, c):
            s.stop()
        drop_postgres(a.database_url)


def test_replica_kill9_its_daemon_and_launcher_move_to_the_others(tmp_path: Path) -> None:
    a, b, c = _replicas(tmp_path, 3, start=1)
    everyone = ",".join(s.address for s in (a, b, c))
    # Only A serves yet, so the daemon's and the launcher's streams land there.
    site = SiteProc(tmp_path, a, address=everyone, elastic_queue__enabled=False)
    clients: list[Client] = []
    launcher = None
    try:
        site.start()
        launcher = LauncherProc(site.dir, a, address=everyone)
        client_a = a.client()
        wait_until(lambda: _active_sessions(client_a, site.id), "the launcher's session",
                   60, interval=0.05, on_timeout=launcher.text)
        (session_id,) = _active_sessions(client_a, site.id)
        client_a.close()
        b.start()
        c.start()
        clients = [b.client(), c.client()]
        watcher = Watcher(clients[1], site.id)
        ids = create_jobs(clients[0], 6, "before", app_name="Nap", site_id=site.id, node_packing_count=8,
                          parameters={"secs": "2"})
        wait_until(lambda: states(clients[0], ids).get("RUNNING", 0) >= 2, "jobs to run", 60,
                   on_timeout=launcher.text)
        before = last_event_id(clients[0])
        a.stop(kill=True)
        down = time.monotonic()
        ids += create_jobs(clients[1], 4, "during", app_name="Nap", site_id=site.id, node_packing_count=8,
                           parameters={"secs": "1"})
        # Recovered: the launcher's session is resumed (not reaped) and jobs progress.
        wait_until(lambda: _progress_after(clients[0], before), "job progress after the kill", 60, interval=0.05,
                   on_timeout=lambda: launcher.text()[-3000:])
        recovery = time.monotonic() - down
        wait_states(clients[0], ids, "JOB_FINISHED", 90, debug=lambda: site.log_tail() + launcher.text()[-2000:])
        result = audit(clients[0], ids, site.ledger)
        record("replica kill -9 (postgres; 3 replicas; its site + launcher)", recovery,
               "session resumed on another replica, job progress", result)
        print(f"\nreplica kill -9: job progress again after {recovery:.2f} s (lease timeout {a.lease_timeout} s)")
        result.assert_clean()
        assert all(j.run_count == 1 for j in clients[0].jobs.filter(id=ids)), "a job ran twice"
        session = clients[0].stub("SessionService").GetSession(_get_session(session_id), metadata=clients[0].metadata,
                                                                timeout=30).session
        assert session.state in (session_pb2.SESSION_STATE_ACTIVE, session_pb2.SESSION_STATE_CLOSED), \
            "the session was reaped: its launcher did not resume it within the lease timeout"
        assert bool(clients[0].sites.get(id=site.id).liveness.connected)
        assert watcher.check(clients[1]) > 0
    finally:
        if launcher is not None:
            launcher.stop()
        site.stop()
        for client in clients:
            client.close()
        for s in (a, b, c):
            s.stop()
        drop_postgres(a.database_url)


def test_replica_drain_hands_its_streams_over(tmp_path: Path) -> None:
    a, b = _replicas(tmp_path, 2, start=1)
    both = f"{a.address},{b.address}"
    # Only A serves yet, so the daemon's and the launcher's streams land there.
    site = SiteProc(tmp_path, a, address=both, elastic_queue__enabled=False)
    launcher = client = watch_client = None
    try:
        site.start()
        launcher = LauncherProc(site.dir, a, address=both)
        client_a = a.client()
        wait_until(lambda: _active_sessions(client_a, site.id), "the launcher's session", 60, interval=0.05,
                   on_timeout=launcher.text)
        (session_id,) = _active_sessions(client_a, site.id)
        client_a.close()
        watch_client = a.client(address=both)
        watcher = Watcher(watch_client, site.id)  # an SDK watch, on A as well
        b.start()
        client = b.client()
        ids = create_jobs(client, 4, "before", app_name="Nap", site_id=site.id, node_packing_count=8,
                          parameters={"secs": "1.5"})
        wait_until(lambda: states(client, ids).get("RUNNING", 0) >= 2, "jobs to run", 60, on_timeout=launcher.text)
        # Their channels have reached B too (they try a replica that was down every <= 2 s).
        wait_until(lambda: _connected_to(site.pid(), b.port) and _connected_to(launcher.proc.pid, b.port),
                   "the daemon's and the launcher's channels to connect to B", 30, interval=0.05)
        b_log = b.log_path.stat().st_size
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        drained = time.monotonic()
        # Handed over: B holds the site's stream and the launcher resumed its session there.
        wait_until(lambda: _logged(b, b_log, "site connected") and _logged(b, b_log, "session resumed", session_id),
                   "the daemon and the launcher to reconnect to B", 30, interval=0.01,
                   on_timeout=lambda: a.log_tail() + launcher.text()[-2000:])
        handover = time.monotonic() - drained
        ids += create_jobs(client, 1, "after", app_name="Nap", site_id=site.id, parameters={"secs": "0.2"})
        wait_states(client, ids, "JOB_FINISHED", 90, debug=lambda: site.log_tail() + launcher.text()[-2000:])
        a.stop()  # exited by now (drain, then the grace for unary calls)
        result = audit(client, ids, site.ledger)
        record("replica drain (postgres; 2 replicas; its site + launcher)", handover,
               "streams ended DRAINING, both reconnected to the other replica", result)
        print(f"\nreplica drain: daemon and launcher on the other replica {handover * 1000:.0f} ms after SIGTERM")
        result.assert_clean()
        assert all(j.run_count == 1 for j in client.jobs.filter(id=ids)), "a job ran twice"
        drain_lines = [e for e in _log_events(a, 0) if e.get("event") == "streams handed over"]
        assert drain_lines and drain_lines[0]["streams"] >= 2, a.log_tail()
        drained_streams = {e["method"] for e in _log_events(a, 0) if e.get("reason") == "DRAINING"}
        assert drained_streams == {"Site.Connect", "Session.Connect", "Event.WatchEvents"}, drained_streams
        # The watch resumed through B from its cursor: every event once, in order.
        assert watcher.check(client) > 0 and watcher.stream.reconnects >= 1
        # The same session carried on (resumed on B, never reaped or replaced).
        assert _active_sessions(client, site.id) == [session_id]
        assert bool(client.sites.get(id=site.id).liveness.connected)
    finally:
        if launcher is not None:
            launcher.stop()
        site.stop()
        for c in (client, watch_client):
            if c is not None:
                c.close()
        for s in (a, b):
            s.stop()
        drop_postgres(a.database_url)


def _connected_to(pid: int, port: int) -> bool:
    """The process has a TCP connection established to `port` (on this host)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


def _log_events(server: ServerProc, offset: int) -> list[dict]:
    """The server's JSON log lines written after byte `offset`."""
    out = []
    for line in server.log_path.read_bytes()[offset:].decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _logged(server: ServerProc, offset: int, event: str, session_id: str = "") -> bool:
    return any(e.get("event") == event and (not session_id or e.get("session_id") == session_id)
               for e in _log_events(server, offset))


def _active_sessions(client: Client, site_id: int) -> list[str]:
    from balsam_grpc.v1 import session_pb2, session_service_pb2

    resp = client.stub("SessionService").ListSessions(
        session_service_pb2.ListSessionsRequest(filter=session_service_pb2.SessionFilter(
            site_ids=[site_id], states=[session_pb2.SESSION_STATE_ACTIVE])),
        metadata=client.metadata, timeout=30)
    return [s.id for s in resp.sessions]


def _get_session(session_id: str):  # type: ignore[no-untyped-def]
    from balsam_grpc.v1 import session_service_pb2

    return session_service_pb2.GetSessionRequest(id=session_id)


def _progress_after(client: Client, event_id: int) -> bool:
    """A job left RUNNING after event `event_id` (reported by the launcher: it works again)."""
    resp = client.stub("EventService").ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(from_states=[J.JOB_STATE_RUNNING]), page_size=1, descending=True),
        metadata=client.metadata, timeout=30)
    return bool(resp.events) and resp.events[0].id > event_id
