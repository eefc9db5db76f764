"""Fault 4: PostgreSQL restarts under load (`pg_ctlcluster ... restart`), with a launcher
running jobs and clients creating jobs.

During the outage a request fails with UNAVAILABLE (retryable: the SDK and daemons send it
again with the same request_id), never INTERNAL or UNKNOWN; the server process survives,
its pooled connections (all dead after the restart) are replaced, and work resumes:
every job whose creation was acknowledged finishes exactly once.

This restarts the PostgreSQL that every other test (and other developers) use: it is
marked `runs_last` (moved to the end of the session by tests/faults/conftest.py) and is
skipped unless the cluster can be restarted from here (root, pg_ctlcluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from balsam_grpc.v1 import job_pb2, job_service_pb2
from tests.conftest import POSTGRES_URL
from tests.faults.conftest import database_url
from tests.faults.harness import (
    LauncherProc,
    ServerProc,
    audit,
    create_jobs,
    launcher_site,
    states,
    wait_states,
)
from tests.faults.report import record
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.timeout(180), pytest.mark.runs_last,
              pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set"),
              pytest.mark.skipif(not shutil.which("pg_ctlcluster") or os.geteuid() != 0 or not Path(
                  "/etc/postgresql").is_dir(), reason="needs root and pg_ctlcluster to restart PostgreSQL")]


def restart_postgres() -> None:
    version = max(os.listdir("/etc/postgresql"))
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True, timeout=60)


class Load:
    """Creates one job at a time through the raw stub (no retries: every status code the
    server answers is seen), records the codes and the acknowledged job ids."""

    def __init__(self, server: ServerProc, app_id: int) -> None:
        self.client = server.client()
        self.app_id = app_id
        self.codes: Counter[str] = Counter()
        self.acked: list[int] = []
        self.details: dict[str, str] = {}
        self.stop = threading.Event()
        self.last_ok = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stub = self.client.stub("JobService")
        n = 0
        while not self.stop.is_set():
            n += 1
            job = job_pb2.Job(app_id=self.app_id, workdir=f"load/{n}",
                              resources=job_pb2.JobResources(node_packing_count=4))
            try:
                resp = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, request_id=f"load-{n}"),
                                      metadata=self.client.metadata, timeout=10)
                self.acked.append(resp.job.id)
                self.codes["OK"] += 1
                self.last_ok = time.monotonic()
            except grpc.RpcError as err:
                self.codes[err.code().name] += 1
                self.details.setdefault(err.code().name, err.details() or "")
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        self.client.close()


def test_postgres_restart_under_load(tmp_path: Path) -> None:
    server = ServerProc(tmp_path / "home", database_url("postgres", tmp_path))
    server.start()
    client = server.client()
    _site, site_dir, app, ledger = launcher_site(server, client, tmp_path, secs=0.5)
    launcher = LauncherProc(site_dir, server, "--cpus-per-node", "4", "--idle-timeout", "6")
    load = None
    try:
        ids = create_jobs(client, 6, "pg", app_id=app.id, node_packing_count=4)
        wait_until(lambda: states(client, ids).get("RUNNING", 0) > 0, "jobs to run", 30, on_timeout=launcher.text)
        load = Load(server, app.id)
        wait_until(lambda: load.codes["OK"] >= 5, "load to flow", 20)
        started = time.monotonic()
        restart_postgres()
        restarted = time.monotonic()
        wait_until(lambda: load.last_ok > restarted, "a create to succeed after the restart", 60, interval=0.05,
                   on_timeout=lambda: f"codes {dict(load.codes)} {load.details}\n{server.log_tail()}")
        recovery = time.monotonic() - started
        time.sleep(1)
        load.close()
        assert server.proc is not None and server.proc.poll() is None, "the server died"
        everything = ids + load.acked
        # SDK calls retry UNAVAILABLE (same request_id): these work right after the outage.
        more = create_jobs(client, 2, "pg-after", app_id=app.id, node_packing_count=4)
        print(f"\nPostgreSQL restart: create codes {dict(load.codes)} {load.details}")
        wait_states(client, everything + more, "JOB_FINISHED", 90, debug=lambda: launcher.text()[-3000:])
        result = audit(client, everything + more, ledger)
        record("PostgreSQL restart under load (launcher + creates)", recovery,
               f"creates succeed; codes {dict(load.codes)}", result)
        result.assert_clean()
        bad = {c: n for c, n in load.codes.items() if c not in ("OK", "UNAVAILABLE")}
        assert not bad, f"requests during the outage failed with {bad}: {load.details}"
        assert launcher.proc.wait(30) == 0, launcher.text()[-3000:]
    finally:
        if load is not None and not load.stop.is_set():
            load.close()
        launcher.stop()
        client.close()
        server.stop()
