"""How SQLite finds a launcher report's jobs: by primary key, never by walking the
owner's jobs. Without statistics (jobs created a few at a time are never analyzed)
SQLite chose ix_jobs_owner_id_state_site_id on the report's owner term and read every
job of the owner for each report (store/leases.report_rows_statement)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from balsam_grpc.server.store import migrate
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.server.store.leases import report_rows_statement
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
