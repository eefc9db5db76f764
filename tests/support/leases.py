"""Stand-in for a launcher in server tests that need a job run but do not test the session
stream: lease jobs to a real session row (the same Transitioner move as acquisition) and
report their run through leases.apply_report, the code the session stream calls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select

from balsam_grpc.core.states import JobState, Role
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import leases
from balsam_grpc.server.store import sessions as session_store
from balsam_grpc.server.store.tables import apps, batch_jobs, jobs, sites, users
from balsam_grpc.server.store.transitions import ENGINE_COLUMNS, Transitioner
from balsam_grpc.v1 import job_pb2


def _write(harness: Any, fn: Any) -> Any:
    """On the server's loop, through Database.write: watchers and streams hear of the events."""
    return harness.embedded.loop.run(harness.db.write(fn))


def lease(harness: Any, owner_id: int, job_ids: list[int], batch_job_id: int | None = None) -> str:
    """Lease the jobs (all of one site, each PREPROCESSED or RESTART_READY) to a new
    session; returns the session id."""

    def work(conn: Any) -> str:
        rows = [dict(r._mapping) for r in conn.execute(
            select(*ENGINE_COLUMNS, jobs.c.lease_generation).where(jobs.c.id.in_(job_ids)).order_by(jobs.c.id))]
        now = utcnow()
        session = session_store.open_session(conn, owner_id, rows[0]["site_id"], batch_job_id, "MPI", [],
                                             "test-launcher", now, now + timedelta(hours=1))
        values = {r["id"]: {"session_id": session["id"], "lease_generation": r["lease_generation"] + 1,
                            "run_count": r["run_count"] + 1} for r in rows}
        engine = Transitioner(conn, now)
        refused = engine.move([{k: v for k, v in r.items() if k != "lease_generation"} for r in rows],
                              JobState.RUNNING, Role.SESSION, values=values)
        assert not refused, refused
        engine.flush()
        return str(session["id"])

    return _write(harness, work)


def report(harness: Any, owner_id: int, session_id: str, job_id: int, state: str, seq: int = 1,
           **kw: Any) -> leases.ReportResult:
    """The session reports `state` (RUN_DONE, RUN_ERROR, ...) for a job it holds."""

    def work(conn: Any) -> leases.ReportResult:
        generation = conn.execute(select(jobs.c.lease_generation).where(jobs.c.id == job_id)).scalar_one()
        return leases.apply_report(conn, owner_id, session_id,
                                   [leases.Transition(seq, job_id, generation, state, **kw)], utcnow())

    return _write(harness, work)


def run(harness: Any, owner_id: int, job_id: int, outcome: str | None = "RUN_DONE") -> str:
    """Lease one job and, unless `outcome` is None, report how its run ended."""
    session_id = lease(harness, owner_id, [job_id])
    if outcome:
        result = report(harness, owner_id, session_id, job_id, outcome)
        assert not result.rejections, result.rejections
    return session_id


_holders: dict[int, str] = {}  # job id -> the session move() leased it to


def move(caller: Any, job_id: int, *states: int) -> None:
    """What a launcher does to a job: RUNNING leases it, later states are its reports."""
    for st in states:
        name = job_pb2.JobState.Name(st).removeprefix("JOB_STATE_")
        if name == "RUNNING":
            _holders[job_id] = lease(caller.harness, caller.user_id, [job_id])
        else:
            result = report(caller.harness, caller.user_id, _holders.pop(job_id), job_id, name)
            assert not result.rejections, result.rejections


def seed_runnable(conn: Connection, n_jobs: int, username: str) -> tuple[int, int, int]:
    """A user with a site, an app, a RUNNING batch job and `n_jobs` runnable jobs packed 64
    to a node, written straight into the tables (session-path tests and
    scripts/bench_reports.py); returns (user, site, batch job) ids."""
    now = datetime.now(UTC)
    uid = conn.execute(insert(users).values(username=username, password_hash="x", create_time=now)
                       .returning(users.c.id)).scalar_one()
    sid = conn.execute(insert(sites).values(owner_id=uid, name="s", create_time=now, update_time=now)
                       .returning(sites.c.id)).scalar_one()
    aid = conn.execute(insert(apps).values(owner_id=uid, site_id=sid, name="a", create_time=now, update_time=now)
                       .returning(apps.c.id)).scalar_one()
    bj = conn.execute(insert(batch_jobs).values(owner_id=uid, site_id=sid, num_nodes=1, wall_time_min=60,
                                                state="RUNNING", create_time=now, update_time=now)
                      .returning(batch_jobs.c.id)).scalar_one()
    for start in range(0, n_jobs, 5000):
        conn.execute(insert(jobs), [
            {"owner_id": uid, "site_id": sid, "app_id": aid, "workdir": f"w/{i}", "state": "PREPROCESSED",
             "node_packing_count": 64, "wall_time_min": 1, "create_time": now, "update_time": now, "state_time": now}
            for i in range(start, min(n_jobs, start + 5000))])
    return uid, sid, bj
