"""Fault 5: black holes. A proxy between a client and the server stops forwarding in both
directions without closing anything, as a dead NAT entry or a pulled cable would. Only
keepalive pings with a ping timeout can notice (BALSAM_KEEPALIVE_* and
BALSAM_SERVER_KEEPALIVE_*, harness.KEEPALIVE_ENV); new connections are forwarded.

- launcher <-> server while its jobs run: the launcher notices, reconnects and resumes its
  session, or (if the server expired it first) loses it, kills its jobs and runs them
  again under a new session. Either way every job finishes once.
- site daemon (and the pilot it started) <-> server while hooks and jobs are in flight:
  the daemon reconnects, work offered on the dead stream is offered again, nothing is
  submitted or applied twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    LauncherProc,
    ServerProc,
    SiteProc,
    Watcher,
    audit,
    create_jobs,
    launcher_site,
    states,
    wait_states,
)
from tests.faults.report import record
from tests.support.proxy import Proxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(150)


def test_blackhole_launcher_connection(server: ServerProc, tmp_path: Path) -> None:
    client = server.client()
    site, site_dir, app, ledger = launcher_site(server, client, tmp_path, secs=3)
    watcher = Watcher(server.client(), site.id)
    ids = create_jobs(client, 8, "bh", app_id=app.id, node_packing_count=4)
    with Proxy(server.address) as proxy:
        launcher = LauncherProc(site_dir, server, "--cpus-per-node", "4", "--idle-timeout", "4",
                                address=proxy.address)
        try:
            wait_until(lambda: states(client, ids).get("RUNNING", 0) == 4, "four jobs to run", 30,
                       on_timeout=launcher.text)
            accepted = proxy.accepted
            proxy.blackhole(new_connections=False)
            holed = time.monotonic()
            wait_until(lambda: proxy.accepted > accepted, "the launcher to notice and reconnect", 30, interval=0.05,
                       on_timeout=launcher.text)
            noticed = time.monotonic() - holed
            wait_states(client, ids, "JOB_FINISHED", 60, debug=launcher.text)
            recovery = time.monotonic() - holed
            text = launcher.text()
            outcome = "resumed" if "session resumed" in text else "expired, re-run"
            result = audit(client, ids, ledger)
            record(f"black hole launcher<->server (session {outcome})", noticed,
                   f"reconnected; all done after {recovery:.1f} s", result)
            result.assert_clean()
            assert proxy.blackholed > 0 or outcome == "resumed"
            assert launcher.proc.wait(30) == 0, text[-3000:]
            assert watcher.check(client) > 0
        finally:
            launcher.stop()
            client.close()


def test_blackhole_site_connection(server: ServerProc, tmp_path: Path) -> None:
    client = server.client()
    with Proxy(server.address) as proxy:
        site = SiteProc(tmp_path, server, address=proxy.address)
        try:
            site.start()
            watcher = Watcher(server.client(), site.id)
            ids = create_jobs(client, 4, "sbh", app_name="Hooked", site_id=site.id, node_packing_count=8,
                              parameters={"delay": "2"})
            workdirs = [site.dir / "data" / j.workdir for j in client.jobs.filter(id=ids)]
            wait_until(lambda: any((w / "hook-started").exists() for w in workdirs), "a postprocess hook to start", 60,
                       on_timeout=site.log_tail)
            accepted = proxy.accepted
            proxy.blackhole(new_connections=False)
            holed = time.monotonic()
            more = create_jobs(client, 2, "sbh-late", app_name="Hooked", site_id=site.id, node_packing_count=8)
            wait_until(lambda: proxy.accepted > accepted, "the site to notice and reconnect", 30, interval=0.05,
                       on_timeout=site.log_tail)
            noticed = time.monotonic() - holed
            wait_states(client, ids + more, "JOB_FINISHED", 90, debug=site.log_tail)
            recovery = time.monotonic() - holed
            result = audit(client, ids + more, site.ledger, hook_ledger=site.hook_ledger)
            record("black hole site daemon+pilot<->server (hooks in flight)", noticed,
                   f"reconnected; all done after {recovery:.1f} s", result)
            result.assert_clean()
            pilots = list(client.batch_jobs.filter(site_id=site.id))
            records = site.scheduler_records()
            assert len(records) == len(pilots), (records, pilots)  # each pilot submitted once
            assert watcher.check(client) > 0
        finally:
            site.stop()
            client.close()
