#!/usr/bin/env python3
"""Server and database work per job on the launcher session path, without gRPC: the
store calls a session stream makes (leases.acquire, leases.report_and_acquire) in a loop,
in this process, against a fresh database.

Usage: scripts/bench_reports.py --database URL [--jobs N] [--batch B] [--pattern held|load]
                                [--rounds R] [--statements] [--json]

Patterns:
- held (bench_e2e's launcher): the session holds B jobs ahead (SessionCredit.reserve_jobs);
  each report starts and ends all of them (RUNNING then RUN_DONE, each with its own time)
  and carries the credit that takes the next B held ahead.
- load (bench_load's sessions): credit for B jobs started at once (RUNNING at lease); each
  report says RUN_DONE for them and carries the credit for B more.
Per report transaction: the server's CPU (this process, time.process_time), the database
backend's CPU (PostgreSQL: /proc of pg_backend_pid, so only on the same machine), and with
--statements the round trips and statements sent (counted at the driver). With --callgrind DIR
the instructions of this process and of the backend per job (see --help). Figures, never assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchkit  # noqa: F401 - first: puts this checkout on sys.path
from benchkit import print_figures  # noqa: E402

from balsam_grpc.server.store import leases, migrate  # noqa: E402
from balsam_grpc.server.store import sessions as session_store  # noqa: E402
from balsam_grpc.server.store.db import Database  # noqa: E402
from tests.support.leases import seed_runnable  # noqa: E402


def seed(db: Database, n: int) -> tuple[int, int, int]:
    uid, sid, bj = db.write_sync(lambda conn: seed_runnable(conn, n, "bench"))
    if db.is_postgres:
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    return uid, sid, bj


def total_instructions(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


class Counter:
    """Statements SQLAlchemy sent (before_cursor_execute) and the times this process waited
    for the database (psycopg's Connection.wait: one per exchange, a pipeline's batch once)."""

    def __init__(self) -> None:
        self.trips = 0
        self.statements = 0

    def install(self, db: Database) -> None:
        import psycopg
        from sqlalchemy import event

        counter = self

        @event.listens_for(db.engine, "before_cursor_execute")
        def _seen(*_: Any) -> None:
            counter.statements += 1

        original = psycopg.Connection.wait

        def wait(self: Any, *args: Any, **kw: Any) -> Any:
            counter.trips += 1
            return original(self, *args, **kw)

        psycopg.Connection.wait = wait  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--pattern", choices=("held", "load"), default="held")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warm", type=int, default=10)
    parser.add_argument("--statements", action="store_true")
    parser.add_argument("--callgrind", type=Path, default=None,
                        help="dump folder: count instructions of this process (run it under valgrind "
                             "--tool=callgrind --instr-atstart=no --callgrind-out-file=DIR/py.%%p) and of the "
                             "backend (a cluster run under callgrind, --callgrind-out-file=DIR/pg.%%p) per job")
    parser.add_argument("--cprofile", type=Path, default=None, help="cProfile the measured rounds into this file")
    parser.add_argument("--drop-index", action="append", default=[],
                        help="drop this index after migrating (what an index costs a job)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    migrate.upgrade(args.database)
    if args.drop_index:
        dropper = Database(args.database, workers=1)
        dropper.write_sync(lambda conn: [conn.exec_driver_sql(f"DROP INDEX {name}") for name in args.drop_index])
        dropper.dispose()
    db = Database(args.database, workers=1)
    uid, sid, bj = seed(db, args.jobs)
    now = datetime.now(UTC)
    session = db.write_sync(lambda conn: session_store.open_session(
        conn, uid, sid, bj, "MPI", [], "bench", now, now + timedelta(hours=1)))
    ref = leases.SessionRef(session["id"], uid, sid, "MPI", bj)
    b = args.batch
    if args.pattern == "held":
        credit = leases.Credit(max_jobs=0, free_nodes=0.0, reserve_jobs=b, reserve_nodes=float(b))
    else:
        credit = leases.Credit(max_jobs=b, free_nodes=float(b))
    state = {"held": [(r["id"], r["lease_generation"]) for r in
                      db.write_sync(leases.acquire, ref, credit, datetime.now(UTC)).jobs], "seq": 0}
    db.dispose()

    def rounds(db: Database, n: int) -> int:
        """n report transactions; the jobs they reported."""
        done = 0
        for _ in range(n):
            transitions = []
            at = datetime.now(UTC)
            for job_id, generation in state["held"]:
                if args.pattern == "held":
                    state["seq"] += 1
                    transitions.append(leases.Transition(state["seq"], job_id, generation, "RUNNING", time=at))
                state["seq"] += 1
                transitions.append(leases.Transition(state["seq"], job_id, generation, "RUN_DONE", return_code=0,
                                                     time=at + timedelta(microseconds=job_id % 1000)))
            result, got = db.write_sync(leases.report_and_acquire, ref, transitions, credit, datetime.now(UTC))
            assert not result.rejections, result.rejections[:3]
            done += len(state["held"])
            state["held"] = [(r["id"], r["lease_generation"]) for r in got.jobs]
            if not state["held"]:
                raise SystemExit("out of jobs: seed more (--jobs)")
        return done

    def backend_of(db: Database) -> int:
        return db.write_sync(lambda conn: conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())

    def backend_kir(pid: int) -> int:
        """The instructions of a backend that exited (its callgrind file, written at exit)."""
        path = args.callgrind / f"pg.{pid}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                return total_instructions(path)
            except (OSError, SystemExit):
                time.sleep(0.5)
        raise SystemExit(f"no callgrind totals in {path}")

    out: dict[str, Any] = {"pattern": args.pattern, "batch": b, "rounds": args.rounds}
    if args.callgrind:
        # Each phase on a backend of its own, whose instructions are counted to its exit:
        # the warm-up phase's (connection, caches, plans, `warm` reports) is subtracted
        # from the measured phase's (the same, then `rounds` reports more).
        warm_db = Database(args.database, workers=1)
        pid_warm = backend_of(warm_db)
        rounds(warm_db, args.warm)
        warm_db.dispose()
        db = Database(args.database, workers=1)
        pid = backend_of(db)
        rounds(db, args.warm)
        me = str(os.getpid())
        subprocess.run(["callgrind_control", "-z", me], capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", me], capture_output=True)
        done = rounds(db, args.rounds)
        before = set(args.callgrind.glob(f"py.{me}.*"))
        subprocess.run(["callgrind_control", "-d", me], capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", me], capture_output=True)
        db.dispose()
        dumps = sorted(set(args.callgrind.glob(f"py.{me}.*")) - before, key=lambda f: f.stat().st_mtime)
        if dumps:
            out["server_kir_per_job"] = round(total_instructions(dumps[-1]) / done / 1000, 1)
        out["database_kir_per_job"] = round((backend_kir(pid) - backend_kir(pid_warm)) / done / 1000, 1)
    else:
        db = Database(args.database, workers=1)
        counter = Counter()
        if args.statements:
            counter.install(db)
        backend = backend_of(db) if db.is_postgres else None

        def backend_cpu() -> float:
            if backend is None:
                return 0.0
            fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        rounds(db, args.warm)
        t_server, t_db = time.process_time(), backend_cpu()
        trips, statements = counter.trips, counter.statements
        if args.cprofile:
            import cProfile

            profiler = cProfile.Profile()
            done = profiler.runcall(rounds, db, args.rounds)
            profiler.dump_stats(args.cprofile)
        else:
            done = rounds(db, args.rounds)
        out["server_us_per_job"] = round(1e6 * (time.process_time() - t_server) / done, 1)
        out["database_us_per_job"] = round(1e6 * (backend_cpu() - t_db) / done, 1)
        if args.statements:
            out["waits_per_report"] = round((counter.trips - trips) / args.rounds, 2)
            out["sqlalchemy_statements_per_report"] = round((counter.statements - statements) / args.rounds, 2)
            if db.is_postgres:  # the server-side prepared statements: plans built each time (custom) or once
                out["plans"] = db.write_sync(lambda conn: [
                    f"{r[1]} custom, {r[2]} generic: {' '.join(r[0].split())[:90]}" for r in conn.exec_driver_sql(
                        "SELECT statement, custom_plans, generic_plans FROM pg_prepared_statements "
                        "ORDER BY custom_plans DESC")])
        db.dispose()
    out["jobs"] = done
    out["load_1m"] = round(os.getloadavg()[0], 2)
    print_figures(out, args.json)

if __name__ == "__main__":
    main()
