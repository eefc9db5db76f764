"""Fault 1: a launcher's node dies (kill -9 of the launcher and its job processes) while
its jobs run. The server notices the missing stream, times the leases out after the lease
timeout, the retry policy restarts the jobs, and a second launcher finishes them: every
job once, an SDK watcher sees every event exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    LEASE_TIMEOUT,
    LauncherProc,
    ServerProc,
    Watcher,
    audit,
    create_jobs,
    launcher_site,
    states,
    wait_states,
)
from tests.faults.report import record
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def test_kill9_launcher_mid_run_second_launcher_finishes(server: ServerProc, tmp_path: Path) -> None:
    client = server.client()
    site, site_dir, app, ledger = launcher_site(server, client, tmp_path)
    watcher = Watcher(server.client(), site.id)
    ids = create_jobs(client, 6, "k", app_id=app.id, node_packing_count=4)
    first = LauncherProc(site_dir, server, "--cpus-per-node", "4")
    second = None
    try:
        wait_until(lambda: states(client, ids).get("RUNNING", 0) == 4, "four jobs to run", 30,
                   on_timeout=first.text)
        wait_until(lambda: ledger.exists() and ledger.read_text().count("start") >= 4, "the jobs to start", 10)
        killed = time.monotonic()
        first.kill_node()
        # The stream is gone: after the lease timeout the jobs time out and are restarted.
        wait_until(lambda: states(client, ids).get("RUNNING", 0) == 0, "the leases to expire", LEASE_TIMEOUT + 15)
        second = LauncherProc(site_dir, server, "--cpus-per-node", "4", "--idle-timeout", "3")
        wait_until(lambda: states(client, ids).get("RUNNING", 0) > 0 or states(client, ids).get("JOB_FINISHED", 0)
                   == len(ids), "the second launcher to run the jobs", 30, interval=0.05)
        recovery = time.monotonic() - killed
        wait_states(client, ids, "JOB_FINISHED", 60, debug=second.text)
        result = audit(client, ids, ledger)
        record("kill -9 launcher mid-run (second launcher)", recovery, "jobs running again", result)
        result.assert_clean()
        assert second.proc.wait(30) == 0
        jobs = {j.id: j for j in client.jobs.filter(id=ids)}
        assert sum(j.run_count == 2 for j in jobs.values()) == 4  # the four killed runs ran again
        assert watcher.check(client) > 0
    finally:
        first.stop()
        if second is not None:
            second.stop()
        client.close()
