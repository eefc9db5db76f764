"""Fault 2: kill -9 of the site daemon, twice on one site: mid-submit, the moment the
`local` scheduler holds the pilot's job record (so the scheduler has accepted it, or is
accepting it, and the journal has not recorded its id yet: the window where a daemon
without a submit intent would submit it again), and while a postprocess hook runs
(mid-hook). Each time the daemon is started again: the pilot is submitted exactly once
(one scheduler job per pilot, every run), the hook's work is redone and applied once,
every job finishes once, and the watcher misses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    ServerProc,
    SiteProc,
    Watcher,
    audit,
    create_jobs,
    wait_states,
)
from tests.faults.report import record
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(150)


def test_kill9_daemon_mid_submit_and_mid_hook(server: ServerProc, tmp_path: Path) -> None:
    client = server.client()
    site = SiteProc(tmp_path, server)
    try:
        site.start()
        watcher = Watcher(server.client(), site.id)
        ids = create_jobs(client, 4, "hk", app_name="Hooked", site_id=site.id, node_packing_count=8,
                          parameters={"delay": "3"})
        # Mid-submit: the scheduler's job record exists (submission accepted or under way);
        # kill before the daemon can journal the scheduler id.
        sched_dir = site.dir / "state" / "local-scheduler"
        wait_until(lambda: sched_dir.is_dir() and any(sched_dir.glob("*.json")), "the scheduler to take a pilot",
                   30, interval=0.005, on_timeout=site.log_tail)
        site.kill9()
        killed = time.monotonic()
        journal = json.loads((site.dir / "state" / "journal.json").read_text())
        window = ("between the scheduler accepting and the journal recording it"
                  if not journal.get("submitted") else "after the journal recorded it")
        site.start()
        wait_until(lambda: all(b.state not in ("PENDING_SUBMISSION", "SUBMIT_FAILED")
                             for b in client.batch_jobs.filter(site_id=site.id)), "the pilot to be submitted", 30,
                   interval=0.05, on_timeout=site.log_tail)
        submit_recovery = time.monotonic() - killed

        workdirs = [site.dir / "data" / j.workdir for j in client.jobs.filter(id=ids)]
        wait_until(lambda: any((w / "hook-started").exists() for w in workdirs), "a postprocess hook to start", 60,
                   on_timeout=site.log_tail)
        site.kill9()
        killed = time.monotonic()
        before = sum(1 for _ in client.jobs.filter(id=ids, state="POSTPROCESSED")) + sum(
            1 for _ in client.jobs.filter(id=ids, state="JOB_FINISHED"))
        site.start()
        wait_until(lambda: sum(1 for _ in client.jobs.filter(id=ids, state="JOB_FINISHED")) > before,
                   "a hook to complete after the restart", 60, interval=0.05, on_timeout=site.log_tail)
        hook_recovery = time.monotonic() - killed
        wait_states(client, ids, "JOB_FINISHED", 90, debug=site.log_tail)

        result = audit(client, ids, site.ledger, hook_ledger=site.hook_ledger)
        pilots = list(client.batch_jobs.filter(site_id=site.id))
        records = site.scheduler_records()
        # A record the kill cut off before its runner started never ran: the restart marks
        # it so and submits the pilot again. Only records whose monitor ran count as jobs.
        ran = [r for r in records if r.get("pid")]
        assert all("never started" in r.get("end_reason", "") for r in records if not r.get("pid")), records
        names = sorted(r["job_name"] for r in ran)
        submitted_once = names == sorted({r["job_name"] for r in ran}) and len(ran) == len(pilots)
        record("kill -9 site daemon mid-submit (restarted)", submit_recovery,
               "pilot submitted" + ("" if submitted_once else f" TWICE ({len(ran)} scheduler jobs ran)")
               + f"; killed {window}", audit(client, [], None))
        record("kill -9 site daemon mid-hook (restarted)", hook_recovery, "a hook completed", result)
        result.assert_clean()
        assert all(b.scheduler_id for b in pilots)
        # Exactly one scheduler submission per pilot, and each pilot's scheduler id is its job.
        assert submitted_once, f"a pilot was submitted twice after kill -9 mid-submit: {records}"
        by_id = {r["scheduler_id"]: r["job_name"] for r in ran}
        assert all(by_id.get(b.scheduler_id, "").endswith(f"-{b.id}") for b in pilots), (by_id, pilots)
        assert watcher.check(client) > 0
    finally:
        site.stop()
        client.close()
