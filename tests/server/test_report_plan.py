"""Plans of the statements run for every launcher report and every batch of finished jobs
on SQLite: they must not walk all of an owner's or a site's jobs. Without statistics
(jobs created a few at a time are never analyzed) SQLite chose
ix_jobs_owner_id_state_site_id on a report's owner term and read every job of the owner
for each report (store/leases.report_rows_statement); with statistics, the site stream's
cleanup query walked every finished job of the site, cleaned ones too
(store/site_work._cleanups_statement)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from balsam_grpc.server.store import migrate
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.server.store.leases import report_rows_statement
from balsam_grpc.server.store.site_work import _cleanups_statement
from balsam_grpc.server.store.tables import apps, jobs, sites, users


def test_a_reports_jobs_are_looked_up_by_id_without_statistics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(insert(users), [{"username": "u", "password_hash": "x", "create_time": now}])
            conn.execute(insert(sites), [{"owner_id": 1, "name": "s", "create_time": now, "update_time": now}])
            conn.execute(insert(apps), [{"owner_id": 1, "site_id": 1, "name": "a", "create_time": now,
                                         "update_time": now}])
            conn.execute(insert(jobs), [{"owner_id": 1, "site_id": 1, "app_id": 1, "workdir": f"w{i}",
                                         "state": "RUNNING", "create_time": now, "update_time": now,
                                         "state_time": now} for i in range(200)])
        with engine.connect() as conn:
            assert not conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").all()  # never analyzed
            compiled = report_rows_statement("sqlite").compile(dialect=engine.dialect)
            sql = str(compiled)
            params = compiled.construct_params({"b_owner": 1, "b_ids": json.dumps([5, 6])})
            plan = [r[3] for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + sql, tuple(params[name] for name in compiled.positiontup))]
            rows = conn.exec_driver_sql(sql, tuple(params[name] for name in compiled.positiontup)).all()
    finally:
        engine.dispose()
    assert [r.id for r in rows] == [5, 6]
    job_steps = [step for step in plan if " jobs " in f" {step} "]
    assert job_steps == ["SEARCH jobs USING INTEGER PRIMARY KEY (rowid=?)"], plan


def test_the_cleanup_query_reads_only_jobs_still_to_clean(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(insert(users), [{"username": "u", "password_hash": "x", "create_time": now}])
            conn.execute(insert(sites), [{"owner_id": 1, "name": "s", "create_time": now, "update_time": now}])
            conn.execute(insert(apps), [{"owner_id": 1, "site_id": 1, "name": name, "create_time": now,
                                         "update_time": now, "cleanup_globs": globs}
                                        for name, globs in (("a", ["*.tmp"]), ("b", []))])
            conn.execute(insert(jobs), [{"owner_id": 1, "site_id": 1, "app_id": 1 + i % 2, "workdir": f"w{i}",
                                         "state": "JOB_FINISHED", "create_time": now, "update_time": now,
                                         "state_time": now, "cleaned_time": None if i % 50 < 2 else now}
                                        for i in range(1000)])
            conn.exec_driver_sql("ANALYZE")
        with engine.connect() as conn:
            compiled = _cleanups_statement("sqlite").compile(dialect=engine.dialect)
            params = compiled.construct_params({"w_site": 1, "w_owner": 1, "w_limit": 100})
            args = tuple(params[name] for name in compiled.positiontup)
            plan = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), args)]
            rows = conn.exec_driver_sql(str(compiled), args).all()
    finally:
        engine.dispose()
    assert [r[0] for r in rows] == [i + 1 for i in range(0, 1000, 50)]  # app a's, not yet cleaned
    assert [step for step in plan if " jobs " in f" {step} "] == [
        "SEARCH jobs USING INDEX ix_jobs_cleanup_due (site_id=? AND app_id=?)"], plan
