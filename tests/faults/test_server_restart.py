"""Fault 3: the server dies (kill -9) and comes back on the same port and database while
a site daemon, the pilot launcher it started and an SDK watcher are connected, with jobs
running and jobs created while it is down or just back. SQLite file and PostgreSQL.

The daemon and the launcher reconnect by themselves (the launcher resumes its session:
the restarted server gives ACTIVE sessions a lease timeout to come back), the watcher
resumes from its cursor, and every job finishes once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.conftest import database_url
from tests.faults.harness import (
    ServerProc,
    SiteProc,
    Watcher,
    audit,
    create_jobs,
    job_progress_after,
    last_event_id,
    site_connected,
    states,
    wait_states,
)
from tests.faults.report import record
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(150)


def test_server_restart_with_site_launcher_and_watcher(backend: str, tmp_path: Path) -> None:
    server = ServerProc(tmp_path / "home", database_url(backend, tmp_path))
    server.start()
    site = SiteProc(tmp_path, server)
    client = watch_client = None
    try:
        client = server.client()
        site.start()
        watch_client = server.client()
        watcher = Watcher(watch_client, site.id)
        ids = create_jobs(client, 6, "before", app_name="Nap", site_id=site.id, node_packing_count=8,
                          parameters={"secs": "3"})
        # The local platform's node has as many CPUs as this machine: two or more run at once.
        wait_until(lambda: states(client, ids).get("RUNNING", 0) >= 2, "jobs to run", 60, on_timeout=site.log_tail)
        before = last_event_id(client)
        client.close()
        server.stop(kill=True)
        down = time.monotonic()
        time.sleep(0.5)
        server.start()
        client = server.client()
        # Recovered: the daemon is connected again and the launcher reports job progress.
        wait_until(lambda: site_connected(client, site.id) and job_progress_after(client, before),
                   "the site and the launcher to be back", 60, interval=0.05, on_timeout=site.log_tail)
        recovery = time.monotonic() - down
        after = create_jobs(client, 2, "after", app_name="Nap", site_id=site.id, node_packing_count=8,
                            parameters={"secs": "1"})
        wait_until(lambda: states(client, after).get("RUNNING", 0) + states(client, after).get("JOB_FINISHED", 0) > 0,
                   "a job created after the restart to run", 60, interval=0.05, on_timeout=site.log_tail)
        wait_states(client, ids + after, "JOB_FINISHED", 60, debug=site.log_tail)
        result = audit(client, ids + after, site.ledger)
        record(f"server kill -9 + restart ({backend}; site, launcher, watcher)", recovery,
               "site connected, job progress", result)
        result.assert_clean()
        # The launcher resumed its session: no job had to time out and run again.
        assert all(j.run_count == 1 for j in client.jobs.filter(id=ids + after))
        assert watcher.check(client) > 0
        assert watcher.stream.reconnects >= 1
    finally:
        site.stop()
        for c in (client, watch_client):
            if c is not None:
                c.close()
        server.stop()
