"""Faults: a launcher killed with SIGKILL while its jobs run, and a stream broken under a
live launcher (through a TCP proxy that drops every connection)."""

from __future__ import annotations

import time
from collections import Counter

from balsam_grpc.v1 import session_pb2, session_service_pb2
from tests.launcher.conftest import LEASE_TIMEOUT, WAIT, Launcher, S
from tests.support.proxy import Proxy


def finished_twice(site, ids):
    counts = {i: Counter(site.events_of(i)) for i in ids}
    return {i: c for i, c in counts.items() if c[("RUN_DONE", "POSTPROCESSED")] != 1
            or c[("STAGED_OUT", "JOB_FINISHED")] != 1}


def test_kill9_launcher_jobs_time_out_restart_and_finish_once(site, launchers):
    app = site.app("nap", "/bin/sh -c 'echo start; sleep 4; echo end'")
    jobs = site.jobs(app, 3, resources={"node_packing_count": 4})
    ids = [j.id for j in jobs]
    first = Launcher(site, "--mode", "serial", "--cpus-per-node", "4")
    launchers.append(first)
    site.wait_states(ids, S.JOB_STATE_RUNNING, proc=first.proc)
    first.kill9()
    killed_at = time.monotonic()
    # The lease timeout passes without a stream: RUN_TIMEOUT, then the default policy restarts.
    site.wait_states(ids, S.JOB_STATE_RESTART_READY, timeout=LEASE_TIMEOUT + 10)
    assert time.monotonic() - killed_at < LEASE_TIMEOUT + 10
    assert all(("RUNNING", "RUN_TIMEOUT") in site.events_of(i) for i in ids)
    second = Launcher(site, "--mode", "serial", "--cpus-per-node", "4", "--idle-timeout", "6")
    launchers.append(second)
    site.wait_states(ids, S.JOB_STATE_JOB_FINISHED, timeout=WAIT, proc=second.proc)
    # The orphans of the first launcher end too (their output says "end" twice), but no job
    # is reported finished twice: the first lease is fenced off.
    assert second.wait(20) == 0
    assert not finished_twice(site, ids)
    assert all(site.get(i).run_count == 2 for i in ids)


def test_broken_stream_resumes_same_session_nothing_lost_or_duplicated(site, launchers):
    proxy = Proxy(site.server.address)
    try:
        app = site.app("short", "/bin/sh -c 'sleep 0.3; echo done'")
        jobs = site.jobs(app, 12, resources={"node_packing_count": 4})
        ids = [j.id for j in jobs]
        launcher = Launcher(site, "--mode", "serial", "--cpus-per-node", "4", "--idle-timeout", "4",
                            server_address=f"127.0.0.1:{proxy.port}")
        launchers.append(launcher)
        deadline = time.monotonic() + WAIT
        cuts = 0
        while cuts < 3 and time.monotonic() < deadline:
            states = site.states(ids)
            if sum(s == S.JOB_STATE_JOB_FINISHED for s in states.values()) >= 3 * (cuts + 1) - 2:
                proxy.cut()
                cuts += 1
            time.sleep(0.2)
        site.wait_states(ids, S.JOB_STATE_JOB_FINISHED, timeout=WAIT, proc=launcher.proc)
        assert launcher.wait(20) == 0
        assert proxy.accepted >= 2, "the stream was never re-established"
        assert not finished_twice(site, ids)
        sessions = site.server.call(site.server.sessions.ListSessions, session_service_pb2.ListSessionsRequest(
            filter=session_service_pb2.SessionFilter(site_ids=[site.id]))).sessions
        text = launcher.text()
        # Every cut is resumed into the same session, which the launcher closes at the end.
        assert [s.state for s in sessions] == [session_pb2.SESSION_STATE_CLOSED]
        assert "session resumed" in text
    finally:
        proxy.close()
