"""What a job's process can reach, through a real launcher: not the launcher's credential
(only its run's own job token, scoped to its site and ending with its run), no folder
outside the site's data folder, nothing readable by other users, and no life after its
launcher (kill -9 of the launcher kills every job process, MPI launches included)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from balsam_grpc.core.jobenv import JOB_TOKEN_ENV, JOB_VISIBLE
from balsam_grpc.v1 import job_pb2, job_service_pb2
from tests.launcher.conftest import WAIT, Launcher, S, Server, Site

# The job: records its environment and what its job token may do, through the SDK.
PROBE = '''
import json, os, sys
from balsam_grpc.sdk import Client
from balsam_grpc.v1 import auth_service_pb2, job_pb2, job_service_pb2
from google.protobuf import field_mask_pb2

child_app, other_site_app, foreign_job, own_job = (int(a) for a in sys.argv[1:5])
client = Client()  # picks BALSAM_JOB_TOKEN up


def code(service, method, request):
    try:
        client.call(service, method, request)
        return "OK"
    except Exception as exc:
        return getattr(getattr(exc, "code", None), "name", type(exc).__name__)


def create(app_id, workdir):
    return job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app_id, workdir=workdir))


out = {"env": dict(os.environ), "token": client.token}
out["create_here"] = code("JobService", "CreateJob", create(child_app, "children/%d" % own_job))
out["create_other_site"] = code("JobService", "CreateJob", create(other_site_app, "x/%d" % own_job))
out["read_own"] = code("JobService", "GetJob", job_service_pb2.GetJobRequest(id=own_job))
out["read_other_user"] = code("JobService", "GetJob", job_service_pb2.GetJobRequest(id=foreign_job))
data = job_pb2.Job(id=own_job)
data.data.update({"seen": True})
out["update_own"] = code("JobService", "UpdateJob", job_service_pb2.UpdateJobRequest(
    job=data, update_mask=field_mask_pb2.FieldMask(paths=["data"])))
out["update_other_user"] = code("JobService", "UpdateJob", job_service_pb2.UpdateJobRequest(
    job=job_pb2.Job(id=foreign_job, data=data.data), update_mask=field_mask_pb2.FieldMask(paths=["data"])))
out["delete_own"] = code("JobService", "DeleteJob", job_service_pb2.DeleteJobRequest(id=own_job))
out["mint_token"] = code("AuthService", "CreateToken", auth_service_pb2.CreateTokenRequest())
json.dump(out, open("probe.json", "w"))
'''


def _status(call: Any, request: Any, token: str) -> grpc.StatusCode:
    try:
        call(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _foreign_job(server: Server, tmp_path: Path) -> int:
    """A job of another user (created through the API with that user's token)."""
    from balsam_grpc.server.auth import hash_password
    from balsam_grpc.server.convert import utcnow
    from balsam_grpc.server.store import users as user_store

    def work(conn: Any) -> str:
        user = user_store.create_user(conn, f"other-{secrets.token_hex(4)}", hash_password("correct horse battery"),
                                      admin=False, now=utcnow())
        return user_store.issue_token(conn, user["id"], scope="USER", site_id=None, ttl=timedelta(hours=1),
                                      description="other user", now=utcnow())[0]

    other = Server.__new__(Server)
    other.__dict__.update(server.__dict__)
    other.metadata = (("authorization", f"Bearer {server.embedded.db.write_sync(work)}"),)
    site = Site(other, tmp_path / "foreign-site")
    return site.jobs(site.app("theirs", "true"))[0].id


@pytest.mark.edge("a job's environment, what its credential may do, its files' modes",
                   "no site credential, only allow-listed BALSAM_ variables; a run-scoped token: own site and job only, dead after the run; "
                   "workdir 0700, job.out 0600")
def test_a_job_holds_only_its_runs_scoped_token(server, site, launchers, tmp_path):
    other_site = Site(server, tmp_path / "other-site")
    other_app = other_site.app("elsewhere", "true")
    foreign = _foreign_job(server, tmp_path)
    child = site.app("child", "true")
    probe_path = tmp_path / "probe.py"
    probe_path.write_text(PROBE)
    # The job's own id is only known once it exists: the probe reads it from BALSAM_JOB_ID.
    app = site.app("probe", f"/bin/sh -c '{sys.executable} {probe_path} {child.id} {other_app.id} {foreign} "
                            "$BALSAM_JOB_ID'")
    job = site.jobs(app)[0]
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--cpus-per-node", "4"))
    site.wait_states([job.id], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
    workdir = site.path / "data" / job.workdir
    probe = json.loads((workdir / "probe.json").read_text())

    env = probe["env"]
    assert "BALSAM_TOKEN" not in env
    assert not [k for k in env if k.startswith("BALSAM_") and k not in JOB_VISIBLE], sorted(env)
    assert not [k for k, v in env.items() if server.token in v], "the launcher's token reached the job"
    token = env[JOB_TOKEN_ENV]
    assert probe["token"] == token and token != server.token

    assert probe["create_here"] == "OK"
    assert probe["create_other_site"] == "PERMISSION_DENIED"
    assert probe["read_own"] == "OK" and probe["update_own"] == "OK"
    assert probe["read_other_user"] == "NOT_FOUND" and probe["update_other_user"] == "PERMISSION_DENIED"
    assert probe["delete_own"] == "PERMISSION_DENIED" and probe["mint_token"] == "PERMISSION_DENIED"
    assert site.get(job.id).data["seen"] is True
    children = server.call(server.jobs.ListJobs, job_service_pb2.ListJobsRequest(
        filter=job_pb2.JobFilter(app_ids=[child.id]))).jobs
    assert [c.workdir for c in children] == [f"children/{job.id}"]

    # The run is over: the token is, too.
    assert _status(server.jobs.GetJob, job_service_pb2.GetJobRequest(id=job.id), token) == \
        grpc.StatusCode.UNAUTHENTICATED
    # A forged token (right shape, wrong signature) never was valid.
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    assert _status(server.jobs.GetJob, job_service_pb2.GetJobRequest(id=job.id), forged) == \
        grpc.StatusCode.UNAUTHENTICATED

    # Owner-only: the workdir (and the folder above it the launcher made), job.out.
    for folder in (workdir, workdir.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((workdir / "job.out").stat().st_mode) == 0o600


@pytest.mark.edge("a workdir that is a symlink out of the data folder",
                   "RUN_ERROR with the reason; nothing written outside")
def test_a_symlinked_workdir_is_refused(server, site, launchers, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (site.path / "data" / "escape").symlink_to(outside, target_is_directory=True)
    app = site.app("touch", "touch written-here")
    bad = server.call(server.jobs.CreateJob, job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="escape/run1"))).job
    good = site.jobs(app)[0]
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--cpus-per-node", "4"))
    site.wait_states([good.id], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
    site.wait_states([bad.id], {S.JOB_STATE_FAILED, S.JOB_STATE_RUN_ERROR}, proc=launcher.proc)
    refused = site.get(bad.id)
    assert "not inside" in refused.state_message or "not inside" in refused.error_tail, refused
    assert list(outside.iterdir()) == [], "the job ran outside the site's data folder"


def _marked_pids(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("ranks", [0, 2], ids=["one-process", "mpi-ranks"])
@pytest.mark.edge("kill -9 of a launcher with jobs running",
                   "no job process alive 5 s later (the test waits up to 10 s)")
def test_job_processes_die_with_a_killed_launcher(server, site, launchers, ranks, record_property):
    """kill -9 of the launcher (the one process, or the mpiexec running its ranks): no job
    process is left, whether started directly, by a worker rank, or by mpiexec, nor one
    that a finished job left running."""
    marker = f"9{secrets.randbelow(10**8):08d}"
    app = site.app("sleeper", f"sleep 1000.{marker}")
    jobs = site.jobs(app, 2, resources={"node_packing_count": 4})
    # A job that ends but leaves a process behind: that one dies with the launcher too.
    leaver = site.app("leaver", f"/bin/sh -c 'sleep 1000.{marker} & echo left one'")
    left = site.jobs(leaver, resources={"node_packing_count": 4})
    expected = 3
    if ranks:  # an mpiexec launch on the second node: its ranks must die too
        jobs += site.jobs(app, resources={"ranks_per_node": 2}, priority=1)
        expected += 3  # mpiexec's own argv holds the marker too
    launchers.append(launcher := Launcher(site, "--mode", "mpi" if ranks else "serial", "--cpus-per-node", "4",
                                          ranks=ranks))
    try:
        site.wait_states([j.id for j in jobs], S.JOB_STATE_RUNNING, proc=launcher.proc)
        site.wait_states([j.id for j in left], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
        deadline = time.monotonic() + WAIT
        while len(_marked_pids(marker)) < expected:
            assert time.monotonic() < deadline, f"jobs did not start: {_marked_pids(marker)}"
            time.sleep(0.1)
        launcher.kill9()
        killed = time.monotonic()
        deadline = killed + 10
        while _marked_pids(marker):
            assert time.monotonic() < deadline, f"job processes outlived their launcher: {_marked_pids(marker)}"
            time.sleep(0.1)
        record_property("observed", f"{expected} job processes gone {time.monotonic() - killed:.1f} s after the kill")
    finally:
        for pid in _marked_pids(marker):  # only on failure: processes this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # What the MPICH processes this kill -9 reached could not remove is removed at the
        # end of the run (tests/conftest.py: a test of another worker may be using its own).


def test_an_mpi_launch_never_puts_the_job_token_in_argv(tmp_path):
    """argv is readable by every user of the node (/proc/<pid>/cmdline): the token travels
    in the MPI launcher's environment, named where the launcher needs a name (Open MPI)."""
    from balsam_grpc.launcher.node_manager import NodeManager, Resources
    from balsam_grpc.launcher.nodes import NodeSpec
    from balsam_grpc.launcher.process_spec import RunContext, build_process_spec
    from balsam_grpc.v1 import app_pb2, session_service_pb2

    secret = "blsmjob_3_2_" + "x" * 43
    job = job_pb2.Job(id=3, app_id=7, workdir="w/3", resources=job_pb2.JobResources(num_nodes=2, ranks_per_node=2))
    lj = session_service_pb2.LeasedJob(job=job, app=app_pb2.App(id=7, name="a", command_template="hostname"),
                                       lease_generation=2, job_token=secret)
    for flavor in ("mpich", "openmpi", "pals", "slurm", "aprun", "jsrun"):
        placed = NodeManager([NodeSpec("h1", 4, 0), NodeSpec("h2", 4, 0)], mpi_mode=True).assign(
            3, Resources.from_pb(job.resources))
        spec = build_process_spec(lj, placed, ["h1", "h2"], RunContext(
            data_dir=tmp_path, apps_dir=tmp_path, mpi_flavor=flavor, server="srv:1"))
        assert not [a for a in spec.argv if secret in a], (flavor, spec.argv)
        assert spec.env[JOB_TOKEN_ENV] == secret and spec.env["BALSAM_SERVER"] == "srv:1"
        if flavor == "openmpi":
            assert JOB_TOKEN_ENV in spec.argv


def test_a_workdir_swapped_for_a_symlink_after_its_check_does_not_move_the_job(tmp_path, monkeypatch):
    """The runner checks the workdir through descriptors, then starts the job: the job
    starts in the folder that was checked, even if a symlink to elsewhere took its name
    in between."""
    from balsam_grpc.launcher import runner as runner_module
    from balsam_grpc.launcher.process_spec import ProcessSpec
    from balsam_grpc.launcher.runner import ProcessRunner

    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    workdir = data / "run1"
    real_spawn = runner_module.spawn

    def swap_then_spawn(*args, **kwargs):
        workdir.rename(data / "checked")
        workdir.symlink_to(outside, target_is_directory=True)
        return real_spawn(*args, **kwargs)

    monkeypatch.setattr(runner_module, "spawn", swap_then_spawn)
    runner = ProcessRunner()
    try:
        assert runner.start(ProcessSpec(job_id=1, argv=["/bin/sh", "-c", "touch written-here"], cwd=str(workdir),
                                        root=str(data))) is None
        deadline = time.monotonic() + 20
        results: list[Any] = []
        while not results:
            assert time.monotonic() < deadline, "the job did not end"
            results = runner.poll()
            time.sleep(0.01)
        assert (results[0].outcome, results[0].return_code) == ("exit", 0), results
    finally:
        runner.shutdown()
    assert list(outside.iterdir()) == [], "the job ran outside the site's data folder"
    assert (data / "checked" / "written-here").exists()
