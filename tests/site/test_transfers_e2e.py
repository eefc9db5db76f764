"""Data staging end to end with the local (file://) backend, all real processes: a server,
`balsamctl site init/start`, the daemon with its transfer service, pilots of the local
scheduler running the launcher.

- a job with two stage-in slots (a file and a directory tree) and one stage-out slot:
  its inputs are in the workdir before it runs (the app reads them), its output lands at
  the destination after postprocess, the job finishes, every step has its event with a
  time, and the items carry their figures;
- a missing source file fails the job with a reason naming the slot, the path and why;
- kill -9 of the daemon in the middle of a copy: the restarted daemon resumes the same
  task, copies no finished file again and the job finishes.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from balsam_grpc.v1 import job_service_pb2, job_service_pb2_grpc, transfer_item_pb2, transfer_item_service_pb2
from balsam_grpc.v1 import transfer_item_service_pb2_grpc
from sitekit import HOOK_APPS, J, SiteKit
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

T = transfer_item_pb2
FAST = dict(scheduler__poll_seconds=1, launcher__idle_timeout_s=6, elastic_queue__enabled=True,
            elastic_queue__min_wall_time_min=5, elastic_queue__check_seconds=1, elastic_queue__max_nodes=1,
            transfers__batch_linger_s=0.2, transfers__poll_seconds=1)

APPS = HOOK_APPS + '''

class Reduce(ApplicationDefinition):
    """Reads its staged inputs, writes the result that is staged out."""
    command_template = "cat raw.dat calib/a.txt calib/sub/b.txt > result.txt"
    shell = True
    transfers = {
        "raw": {"direction": "in", "local_path": "raw.dat", "required": True},
        "calib": {"direction": "in", "local_path": "calib", "recursive": True},
        "result": {"direction": "out", "local_path": "result.txt"},
    }


class Ingest(ApplicationDefinition):
    """Stage-in of a directory tree only."""
    command_template = "ls calib > listing.txt"
    shell = True
    transfers = {"calib": {"direction": "in", "local_path": "calib", "recursive": True}}
'''


@pytest.fixture
def kit(tmp_path, site_database_url):
    k = SiteKit(tmp_path, site_database_url)
    k.start_server()
    yield k
    k.stop()


def _locations(tmp: Path) -> dict[str, str]:
    (tmp / "aps").mkdir()
    (tmp / "eagle").mkdir()
    return {"aps": f"file://{tmp / 'aps'}", "eagle": f"file://{tmp / 'eagle'}"}


def _create(kit: SiteKit, app: str, transfers: dict[str, str]) -> J.Job:
    job = J.Job(app_name=app, site_id=kit.site_id, workdir=f"x/{uuid.uuid4().hex[:8]}", transfers=transfers,
                resources=J.JobResources(node_packing_count=8))
    resp = kit.stub(job_service_pb2_grpc.JobServiceStub).BatchCreateJobs(
        job_service_pb2.BatchCreateJobsRequest(jobs=[job]), metadata=kit.metadata, timeout=30)
    return resp.jobs[0]


def _items(kit: SiteKit, job_id: int) -> dict[str, T.TransferItem]:
    resp = kit.stub(transfer_item_service_pb2_grpc.TransferServiceStub).ListTransferItems(
        transfer_item_service_pb2.ListTransferItemsRequest(
            filter=transfer_item_service_pb2.TransferItemFilter(job_ids=[job_id])), metadata=kit.metadata, timeout=30)
    return {i.slot: i for i in resp.transfer_items}


def _job(kit: SiteKit, job_id: int) -> J.Job:
    return kit.jobs([job_id])[0]


def test_stage_in_run_stage_out(kit, tmp_path):
    kit.init_site(apps=APPS, transfer_locations=_locations(tmp_path), **FAST)
    aps = tmp_path / "aps"
    (aps / "run1").mkdir()
    (aps / "run1" / "raw.dat").write_text("raw frames\n")
    (aps / "calib" / "sub").mkdir(parents=True)
    (aps / "calib" / "a.txt").write_text("calib a\n")
    (aps / "calib" / "sub" / "b.txt").write_text("calib b\n")
    kit.start_daemon()

    job = _create(kit, "Reduce", {"raw": "aps:/run1/raw.dat", "calib": "aps:/calib",
                                  "result": "eagle:/out/run1/result.txt"})
    kit.wait_jobs([job.id], J.JOB_STATE_JOB_FINISHED, 120)

    # The app read its inputs (they were in the workdir before it ran) and its output
    # reached the destination.
    assert (tmp_path / "eagle" / "out" / "run1" / "result.txt").read_text() == "raw frames\ncalib a\ncalib b\n"
    workdir = kit.site_dir / "data" / job.workdir
    assert (workdir / "calib" / "sub" / "b.txt").read_text() == "calib b\n"
    assert not list(workdir.rglob("*.balsam-part"))

    items = _items(kit, job.id)
    assert {s: i.state for s, i in items.items()} == {s: T.TRANSFER_STATE_DONE for s in ("raw", "calib", "result")}
    assert (items["raw"].metrics.bytes, items["raw"].metrics.files) == (11, 1)
    assert (items["calib"].metrics.bytes, items["calib"].metrics.files) == (16, 2)
    assert items["result"].metrics.bytes == 27 and items["result"].task_id.startswith("local-")
    assert items["raw"].task_id == items["calib"].task_id  # one task for the batch of the same location

    events = kit.job_events(job.id)
    steps = [(J.JobState.Name(e.job_state.from_state), J.JobState.Name(e.job_state.to_state), e)
             for e in events if e.WhichOneof("change") == "job_state"]
    by_pair = {(a.removeprefix("JOB_STATE_"), b.removeprefix("JOB_STATE_")): e for a, b, e in steps}
    staged_in = by_pair[("READY", "PREPROCESSED")]
    assert list(staged_in.data["via"]) == ["STAGED_IN"] and staged_in.data["transfers"] == 2
    running = by_pair[("PREPROCESSED", "RUNNING")]
    finished = by_pair[("POSTPROCESSED", "JOB_FINISHED")]
    assert list(finished.data["via"]) == ["STAGED_OUT"]
    assert staged_in.time.ToDatetime() <= running.time.ToDatetime() <= finished.time.ToDatetime()
    transfer_events = [e for e in events if e.WhichOneof("change") == "transfer_state"]
    done = {e.transfer_state.transfer_item_id for e in transfer_events
            if e.transfer_state.to_state == T.TRANSFER_STATE_DONE}
    assert done == {i.id for i in items.values()}
    # The CLI shows the items and the per-task figures (bytes, files, duration, rate).
    listing = json.loads(kit.balsamctl("transfers", "ls", "--job", str(job.id), "-o", "json").stdout)
    assert {(i["slot"], i["state"]) for i in listing} == {("raw", "DONE"), ("calib", "DONE"),
                                                         ("result", "DONE")}
    tasks = json.loads(kit.balsamctl("transfers", "tasks", "--job", str(job.id), "-o", "json").stdout)
    assert sorted(t["items"] for t in tasks) == [1, 2] and sum(t["bytes"] for t in tasks) == 11 + 16 + 27
    print("\nSTAGING timeline:")
    for e in events:
        change = e.WhichOneof("change")
        c = getattr(e, change)
        enum = J.JobState if change == "job_state" else T.TransferState
        print(f"  {e.time.ToDatetime():%H:%M:%S.%f} {change:15s} {enum.Name(c.from_state):28s} -> "
              f"{enum.Name(c.to_state)}")


def test_missing_source_fails_the_job(kit, tmp_path):
    kit.init_site(apps=APPS, transfer_locations=_locations(tmp_path), **FAST)
    (tmp_path / "aps" / "calib").mkdir()
    kit.start_daemon()
    job = _create(kit, "Reduce", {"raw": "aps:/run1/missing.dat", "calib": "aps:/calib",
                                  "result": "eagle:/out/result.txt"})
    wait_until(lambda: _job(kit, job.id).state == J.JOB_STATE_FAILED, "the job to fail", 60)
    failed = _job(kit, job.id)
    message = failed.state_message
    for part in ("stage-in of slot 'raw'", "aps:/run1/missing.dat", "source not found", "missing.dat"):
        assert part in message, message
    items = _items(kit, job.id)
    assert items["raw"].state == T.TRANSFER_STATE_ERROR and "source not found" in items["raw"].error
    assert items["result"].state == T.TRANSFER_STATE_AWAITING_JOB  # never released
    listing = json.loads(kit.balsamctl("transfers", "ls", "--job", str(job.id), "--state", "ERROR", "-o",
                                       "json").stdout)
    assert [i["slot"] for i in listing] == ["raw"] and "source not found" in listing[0]["error"]

    # Globus login needs a client id first: a clear error, no network.
    res = kit.balsamctl("site", "globus-login", str(kit.site_dir), "--check", check=False)
    assert res.returncode == 2 and "transfers.globus.client_id is not set" in res.stderr


def test_kill_9_mid_copy_resumes_without_copying_twice(kit, tmp_path):
    # 2 MB/s: four 1.5 MB files take about 3 s, long enough to kill the daemon mid-copy.
    kit.init_site(apps=APPS, transfer_locations=_locations(tmp_path), transfers__local_bandwidth_mb_s=2.0,
                  **FAST)
    calib = tmp_path / "aps" / "big"
    calib.mkdir()
    payload = {f"f{i}.bin": os.urandom(1_500_000) for i in range(4)}
    for name, data in payload.items():
        (calib / name).write_bytes(data)
    kit.start_daemon()
    job = _create(kit, "Ingest", {"calib": "aps:/big"})
    target = kit.site_dir / "data" / job.workdir / "calib"
    wait_until(lambda: (target / "f0.bin").exists(), "the first file to land", 60, interval=0.05)
    first_inode = (target / "f0.bin").stat().st_ino
    item = _items(kit, job.id)["calib"]
    assert item.state == T.TRANSFER_STATE_ACTIVE and item.task_id
    kit.kill_daemon()
    assert not (target / "f3.bin").exists(), "the copy finished before the kill; the test proves nothing"
    assert _items(kit, job.id)["calib"].state == T.TRANSFER_STATE_ACTIVE  # nothing lost on the server

    kit.start_daemon()
    kit.wait_jobs([job.id], J.JOB_STATE_JOB_FINISHED, 120)
    for name, data in payload.items():
        assert (target / name).read_bytes() == data
    assert (target / "f0.bin").stat().st_ino == first_inode  # not copied again
    assert not list(target.glob(".*.balsam-part"))
    done = _items(kit, job.id)["calib"]
    assert done.state == T.TRANSFER_STATE_DONE and done.task_id == item.task_id  # the same task, resumed
    assert (done.metrics.bytes, done.metrics.files) == (6_000_000, 4)
    log = (kit.site_dir / "logs" / "site.log").read_text()
    assert "transfer journal loaded" in log
