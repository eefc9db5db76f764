"""Hooks run in child processes; results follow the contract whatever the hook does."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest
from google.protobuf import json_format, struct_pb2

from balsam_grpc.site.processes import processes_naming
from balsam_grpc.site.hook_process import HOOK_LOG, HookPool
from balsam_grpc.site.hooks import natural_next_state
from balsam_grpc.v1 import app_pb2, job_pb2, site_service_pb2
from tests.support.waiting import wait_until

H = site_service_pb2
J = job_pb2

APPS = textwrap.dedent('''
    import os, time
    from balsam_grpc.core.appdef import ApplicationDefinition
    from balsam_grpc.v1 import job_pb2

    class Good(ApplicationDefinition):
        command_template = "echo hi"
        def postprocess(self):
            print("post in", os.getcwd())
            self.job.data = {**self.job.data, "answer": 42}
            self.job.tags["checked"] = "yes"
            self.new_jobs.append(job_pb2.Job(app_name="Good", workdir="child", site_id=1))
        def handle_error(self):
            self.job.state = "RESTART_READY"

    class Bad(ApplicationDefinition):
        command_template = "echo hi"
        def preprocess(self):
            raise RuntimeError("bad input file")
        def postprocess(self):
            os._exit(3)
        def handle_timeout(self):
            time.sleep(60)

    class Env(ApplicationDefinition):
        command_template = "echo hi"
        def preprocess(self):
            print("balsam vars:", sorted(k for k in os.environ if k.startswith("BALSAM_")))
''')


def app(name, **kw):
    return app_pb2.App(id=1, site_id=1, name=name, class_path=f"apps.{name}", **kw)


def job(state, run_count=1):
    data = struct_pb2.Struct()
    data.update({"x": 1})
    return job_pb2.Job(id=9, app_id=1, site_id=1, workdir="w/9", state=state, run_count=run_count, data=data)


def test_natural_next_states():
    plain = app_pb2.App()
    restart = app_pb2.App(retry_policy=app_pb2.RetryPolicy(on_error=app_pb2.RETRY_ACTION_RESTART, max_retries=2,
                                                          on_timeout=app_pb2.RETRY_ACTION_FAIL))
    assert natural_next_state(H.HOOK_KIND_PREPROCESS, plain, 0) == J.JOB_STATE_PREPROCESSED
    assert natural_next_state(H.HOOK_KIND_POSTPROCESS, plain, 1) == J.JOB_STATE_POSTPROCESSED
    assert natural_next_state(H.HOOK_KIND_HANDLE_ERROR, plain, 1) == J.JOB_STATE_FAILED
    assert natural_next_state(H.HOOK_KIND_HANDLE_ERROR, restart, 2) == J.JOB_STATE_RESTART_READY
    assert natural_next_state(H.HOOK_KIND_HANDLE_ERROR, restart, 3) == J.JOB_STATE_FAILED
    assert natural_next_state(H.HOOK_KIND_HANDLE_TIMEOUT, plain, 1) == J.JOB_STATE_RESTART_READY
    assert natural_next_state(H.HOOK_KIND_HANDLE_TIMEOUT, restart, 1) == J.JOB_STATE_FAILED


@pytest.fixture
def pool(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "apps.py").write_text(APPS)
    return HookPool(apps, workers=2, timeout_s=5, scratch_dir=tmp_path / "state" / "hooks")


def run(pool, tmp_path, app_name, hook, state):
    wd = tmp_path / "data" / "w" / "9"
    msg = H.RunHook(job=job(state), app=app(app_name), hook=hook)
    return asyncio.run(pool.run(msg, wd)), wd


def test_postprocess_changes_data_tags_and_creates_jobs(pool, tmp_path):
    result, wd = run(pool, tmp_path, "Good", H.HOOK_KIND_POSTPROCESS, J.JOB_STATE_RUN_DONE)
    assert result.next_state == J.JOB_STATE_POSTPROCESSED
    assert sorted(result.job_mask.paths) == ["data", "tags"]
    assert json_format.MessageToDict(result.job_changes.data) == {"x": 1, "answer": 42}
    assert dict(result.job_changes.tags) == {"checked": "yes"}
    assert [j.workdir for j in result.new_jobs] == ["child"]
    log = (wd / HOOK_LOG).read_text()
    assert f"post in {wd}" in log and "postprocess job 9" in log


def test_hooks_get_no_site_credential_and_write_owner_only(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("BALSAM_TOKEN", "blsm_site_secret")
    monkeypatch.setenv("BALSAM_GLOBUS_CLIENT_SECRET", "globus-secret")
    monkeypatch.setenv("BALSAM_SERVER", "127.0.0.1:1")
    result, wd = run(pool, tmp_path, "Env", H.HOOK_KIND_PREPROCESS, J.JOB_STATE_STAGED_IN)
    assert result.next_state == J.JOB_STATE_PREPROCESSED, result.state_message
    log = (wd / HOOK_LOG).read_text()
    assert "balsam vars: ['BALSAM_SERVER']" in log, log
    assert "secret" not in log
    for folder in (wd, wd.parent, wd.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((wd / HOOK_LOG).stat().st_mode) == 0o600


def test_hook_chooses_the_state(pool, tmp_path):
    result, _ = run(pool, tmp_path, "Good", H.HOOK_KIND_HANDLE_ERROR, J.JOB_STATE_RUN_ERROR)
    assert result.next_state == J.JOB_STATE_RESTART_READY and not result.job_mask.paths


def test_exception_fails_the_job_with_the_traceback(pool, tmp_path):
    result, wd = run(pool, tmp_path, "Bad", H.HOOK_KIND_PREPROCESS, J.JOB_STATE_STAGED_IN)
    assert result.next_state == J.JOB_STATE_FAILED
    assert "RuntimeError: bad input file" in result.state_message and "Traceback" in result.state_message
    assert "bad input file" in (wd / HOOK_LOG).read_text()


def test_crashing_hook_process_fails_only_that_job(pool, tmp_path):
    result, _ = run(pool, tmp_path, "Bad", H.HOOK_KIND_POSTPROCESS, J.JOB_STATE_RUN_DONE)
    assert result.next_state == J.JOB_STATE_FAILED and "exited with code 3" in result.state_message


def test_hanging_hook_is_killed(tmp_path, pool):
    pool.timeout_s = 1.5
    result, _ = run(pool, tmp_path, "Bad", H.HOOK_KIND_HANDLE_TIMEOUT, J.JOB_STATE_RUN_TIMEOUT)
    assert result.next_state == J.JOB_STATE_FAILED and "killed" in result.state_message


def test_unknown_app_class_fails_with_a_clear_message(pool, tmp_path):
    result, _ = run(pool, tmp_path, "Missing", H.HOOK_KIND_POSTPROCESS, J.JOB_STATE_RUN_DONE)
    assert result.next_state == J.JOB_STATE_FAILED and "not found" in result.state_message
    assert "apps.Good" in result.state_message


KILLED_DAEMON = textwrap.dedent('''
    import asyncio, sys
    from pathlib import Path
    from balsam_grpc.site.hook_process import HookPool
    from balsam_grpc.v1 import app_pb2, job_pb2, site_service_pb2 as H

    apps, scratch, wd = (Path(a) for a in sys.argv[1:])
    run = H.RunHook(job=job_pb2.Job(id=9, app_id=1, site_id=1, workdir="w/9", state=job_pb2.JOB_STATE_RUN_TIMEOUT),
                    app=app_pb2.App(id=1, site_id=1, name="Bad", class_path="apps.Bad"),
                    hook=H.HOOK_KIND_HANDLE_TIMEOUT)
    print(asyncio.run(HookPool(apps, workers=1, timeout_s=60, scratch_dir=scratch).run(run, wd)))
''')


def _hook_folders(root):
    return sorted(str(p) for p in root.rglob("balsam-hook-*"))


def _hook_pids(apps):
    return processes_naming(str(apps), with_arg="balsam_grpc.site.hook_process")


def test_a_hook_killed_with_sigkill_leaves_no_folder(pool, tmp_path, monkeypatch):
    """The pool owns the hook's folder: a hook process killed from outside fails its job and
    leaves nothing behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tempfile puts folders when none is given

    async def kill_the_hook_then_wait():
        msg = H.RunHook(job=job(J.JOB_STATE_RUN_TIMEOUT), app=app("Bad"), hook=H.HOOK_KIND_HANDLE_TIMEOUT)
        task = asyncio.ensure_future(pool.run(msg, tmp_path / "data" / "w" / "9"))
        pids = await asyncio.to_thread(wait_until, lambda: _hook_pids(pool.apps_dir), "the hook to start")
        assert _hook_folders(tmp_path)
        os.kill(pids[0], signal.SIGKILL)
        return await task

    result = asyncio.run(kill_the_hook_then_wait())
    assert result.next_state == J.JOB_STATE_FAILED and "code -9" in result.state_message
    assert _hook_folders(tmp_path) == []


def test_a_killed_daemons_hook_folders_are_removed_when_the_next_one_starts(tmp_path):
    """kill -9 of the daemon mid-hook: the hook dies with it (PDEATHSIG), and the folder the
    daemon made for it (request, result) was left in /tmp for good; it now lives in the site's
    scratch folder, which the next daemon's pool empties when it starts."""
    apps, scratch, wd = tmp_path / "apps", tmp_path / "state" / "hooks", tmp_path / "data" / "w" / "9"
    apps.mkdir()
    (apps / "apps.py").write_text(APPS)
    tmp = tmp_path / "tmp"  # where tempfile puts folders when none is given
    tmp.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", KILLED_DAEMON, str(apps), str(scratch), str(wd)],
                              env={**os.environ, "TMPDIR": str(tmp)})
    try:
        hook = wait_until(lambda: _hook_pids(apps), "the hook to start")[0]
        assert _hook_folders(tmp_path)
    finally:
        daemon.kill()
        daemon.wait()
    wait_until(lambda: not psutil.pid_exists(hook) or psutil.Process(hook).status() == psutil.STATUS_ZOMBIE,
               "the hook to die with the daemon")
    HookPool(apps, workers=1, timeout_s=5, scratch_dir=scratch)  # the next daemon starts
    assert _hook_folders(tmp_path) == []
