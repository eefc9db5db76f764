"""Transfer work on the site stream, SQLite and PostgreSQL: which items are offered, how
the site's reports are applied, and how the job follows its items.

A scripted site (SiteClient from test_site_stream) declares the "transfers" capability,
takes "transfer:<item id>" work and reports progress the way the daemon's transfer
service does: the answer to the work item at once (the item is queued at the site), then
"transfer-task:<key>:<phase>" reports with ACTIVE / DONE / ERROR.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from balsam_grpc.v1 import (
    app_pb2,
    common_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
    transfer_item_service_pb2_grpc,
)
from tests.support.leases import move
from tests.support.records import get_job, make_app, make_jobs, make_site
from tests.support.site_stream import SiteClient, pb

JS = job_pb2
T = transfer_item_pb2
IN, OUT = common_pb2.TRANSFER_DIRECTION_IN, common_pb2.TRANSFER_DIRECTION_OUT
CAPS = ("batch_jobs", "hooks", "cleanup", "transfers")


@pytest.fixture
def site_clients() -> Any:
    opened: list[SiteClient] = []
    yield opened
    for c in opened:
        c.close()


def _slots() -> list[app_pb2.TransferSlot]:
    return [app_pb2.TransferSlot(name="raw", direction=IN, local_path="raw.dat", required=True),
            app_pb2.TransferSlot(name="calib", direction=IN, local_path="calib", recursive=True),
            app_pb2.TransferSlot(name="result", direction=OUT, local_path="result.h5")]


def _transfer_job(caller: Any, app: app_pb2.App, **kw: Any) -> JS.Job:
    (job,) = make_jobs(caller, app, 1, transfers={"raw": "aps:/data/run1/raw.dat", "calib": "aps:/calib/v2",
                                              "result": "eagle:/results/run1.h5"}, **kw)
    return job


def _items(caller: Any, job_id: int) -> dict[str, T.TransferItem]:
    stub = caller.stub(transfer_item_service_pb2_grpc.TransferServiceStub)
    resp = stub.ListTransferItems(transfer_item_service_pb2.ListTransferItemsRequest(
        filter=transfer_item_service_pb2.TransferItemFilter(job_ids=[job_id])))
    return {i.slot: i for i in resp.transfer_items}


def _events(caller: Any, job_id: int) -> list[event_pb2.Event]:
    stub = caller.stub(event_service_pb2_grpc.EventServiceStub)
    resp = stub.ListEvents(event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(job_ids=[job_id])))
    return list(resp.events)


def _report(client: SiteClient, key: str, *items: T.TransferItem) -> pb.ResultAck:
    return client.result(work_id=f"transfer-task:{key}", transfers=pb.TransferUpdate(items=list(items)))


def _item(item_id: int, state: int, **kw: Any) -> T.TransferItem:
    return T.TransferItem(id=item_id, state=state, **kw)


def _connect(caller: Any, site_id: int, clients: list[SiteClient], **kw: Any) -> SiteClient:
    client = SiteClient(caller, site_id, capabilities=kw.pop("capabilities", CAPS), **kw)
    clients.append(client)
    client.welcome()
    return client


def _transfer_work(work: list[pb.WorkItem]) -> dict[str, pb.WorkItem]:
    return {w.id: w for w in work if w.WhichOneof("kind") == "start_transfers"}


def test_stage_in_then_stage_out_moves_the_job(alice, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=_slots())
    job = _transfer_job(alice, app)
    assert job.state == JS.JOB_STATE_READY  # waits for its stage-in
    items = _items(alice, job.id)
    assert {s: i.state for s, i in items.items()} == {
        "raw": T.TRANSFER_STATE_PENDING, "calib": T.TRANSFER_STATE_PENDING, "result": T.TRANSFER_STATE_AWAITING_JOB}

    client = _connect(alice, site.id, site_clients)
    work, _ = client.barrier()
    offered = _transfer_work(work)
    raw, calib, result = items["raw"], items["calib"], items["result"]
    assert set(offered) == {f"transfer:{raw.id}", f"transfer:{calib.id}"}  # stage-out waits
    sent = offered[f"transfer:{raw.id}"].start_transfers.items[0]
    assert (sent.location_alias, sent.remote_path, sent.local_path, sent.job_workdir, sent.direction) == (
        "aps", "/data/run1/raw.dat", "raw.dat", job.workdir, IN)
    assert offered[f"transfer:{calib.id}"].start_transfers.items[0].recursive

    # Taken and queued at the site: the answer changes nothing and the item is not offered again.
    for wid, item in ((f"transfer:{raw.id}", raw), (f"transfer:{calib.id}", calib)):
        client.send(ack=pb.WorkAck(work_ids=[wid]))
        ack = client.result(work_id=wid, transfers=pb.TransferUpdate(items=[_item(item.id, T.TRANSFER_STATE_PENDING)]))
        assert wid in ack.work_ids and not ack.errors
    client.send(credit=pb.SiteCredit(items=2))
    work, _ = client.barrier()
    assert not _transfer_work(work)

    ack = _report(client, "k1:active", _item(raw.id, T.TRANSFER_STATE_ACTIVE, task_id="task-1"),
                  _item(calib.id, T.TRANSFER_STATE_ACTIVE, task_id="task-1"))
    assert not ack.errors
    assert {i.state for i in _items(alice, job.id).values() if i.direction == IN} == {T.TRANSFER_STATE_ACTIVE}
    metrics = T.TransferMetrics(bytes=1000, files=1, duration_seconds=2.0)
    _report(client, "k1:done-a", _item(raw.id, T.TRANSFER_STATE_DONE, task_id="task-1", metrics=metrics))
    assert get_job(alice, job.id).state == JS.JOB_STATE_READY  # one stage-in item still moving
    _report(client, "k1:done-b", _item(calib.id, T.TRANSFER_STATE_DONE, task_id="task-1",
                                       metrics=T.TransferMetrics(bytes=24, files=3, duration_seconds=2.0)))
    assert get_job(alice, job.id).state == JS.JOB_STATE_PREPROCESSED  # STAGED_IN, no preprocess hook
    got = _items(alice, job.id)["raw"]
    assert (got.state, got.task_id, got.metrics.bytes, got.metrics.files) == (T.TRANSFER_STATE_DONE, "task-1", 1000, 1)

    # A repeated report (resent after a reconnect) changes nothing.
    ack = _report(client, "k1:done-a", _item(raw.id, T.TRANSFER_STATE_DONE, task_id="task-1", metrics=metrics))
    assert not ack.errors
    assert get_job(alice, job.id).state == JS.JOB_STATE_PREPROCESSED

    staged = [e for e in _events(alice, job.id) if e.WhichOneof("change") == "job_state"
              and e.job_state.from_state == JS.JOB_STATE_READY]
    assert len(staged) == 1 and staged[0].job_state.to_state == JS.JOB_STATE_PREPROCESSED
    assert staged[0].data["transfers"] == 2 and staged[0].data["bytes"] == 1024
    assert list(staged[0].data["via"]) == ["STAGED_IN"]

    # The run: stage-out is released when the job reaches POSTPROCESSED and offered at once.
    assert _items(alice, job.id)["result"].state == T.TRANSFER_STATE_AWAITING_JOB
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    assert get_job(alice, job.id).state == JS.JOB_STATE_POSTPROCESSED
    item = client.next("work")
    assert item.id == f"transfer:{result.id}"
    sent = item.start_transfers.items[0]
    assert (sent.direction, sent.state, sent.remote_path) == (OUT, T.TRANSFER_STATE_PENDING, "/results/run1.h5")
    _report(client, "k2:done", _item(result.id, T.TRANSFER_STATE_DONE, task_id="task-2",
                                     metrics=T.TransferMetrics(bytes=5, files=1, duration_seconds=0.5)))
    assert get_job(alice, job.id).state == JS.JOB_STATE_JOB_FINISHED

    changes = [(e.transfer_state.transfer_item_id, e.transfer_state.from_state, e.transfer_state.to_state)
               for e in _events(alice, job.id) if e.WhichOneof("change") == "transfer_state"]
    assert (result.id, T.TRANSFER_STATE_AWAITING_JOB, T.TRANSFER_STATE_PENDING) in changes
    assert (raw.id, T.TRANSFER_STATE_PENDING, T.TRANSFER_STATE_ACTIVE) in changes
    assert (raw.id, T.TRANSFER_STATE_ACTIVE, T.TRANSFER_STATE_DONE) in changes
    assert len(changes) == 6  # 2 x (PENDING->ACTIVE, ACTIVE->DONE), AWAITING->PENDING, PENDING->DONE; no repeats
    done_event = next(e for e in _events(alice, job.id) if e.WhichOneof("change") == "transfer_state"
                      and e.transfer_state.transfer_item_id == raw.id
                      and e.transfer_state.to_state == T.TRANSFER_STATE_DONE)
    assert done_event.data["bytes"] == 1000 and done_event.data["task_id"] == "task-1"


def test_failed_stage_in_fails_the_job_with_the_reason(alice, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=_slots())
    job = _transfer_job(alice, app)
    items = _items(alice, job.id)
    client = _connect(alice, site.id, site_clients)
    client.barrier()
    ack = _report(client, "k:error", _item(items["raw"].id, T.TRANSFER_STATE_ERROR, task_id="t",
                                           error="source file not found: /data/run1/raw.dat"))
    assert not ack.errors
    failed = get_job(alice, job.id)
    assert failed.state == JS.JOB_STATE_FAILED
    for part in ("stage-in", "'raw'", "aps:/data/run1/raw.dat", "raw.dat", "source file not found"):
        assert part in failed.state_message, failed.state_message
    assert _items(alice, job.id)["raw"].error == "source file not found: /data/run1/raw.dat"
    # The other stage-in item of the failed job is no longer offered after a reconnect.
    client.close()
    again = _connect(alice, site.id, site_clients)
    work, _ = again.barrier()
    assert not _transfer_work(work)


def test_failed_stage_out_fails_the_job(alice, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=[app_pb2.TransferSlot(name="result", direction=OUT, local_path="r.h5")])
    (job,) = make_jobs(alice, app, 1, transfers={"result": "eagle:/results/r.h5"})
    assert job.state == JS.JOB_STATE_PREPROCESSED  # nothing to stage in
    client = _connect(alice, site.id, site_clients)
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    item = client.next("work")
    item_id = item.start_transfers.items[0].id
    _report(client, "k:err", _item(item_id, T.TRANSFER_STATE_ERROR, error="permission denied on /results"))
    failed = get_job(alice, job.id)
    assert failed.state == JS.JOB_STATE_FAILED
    assert "stage-out of slot 'result' (r.h5 -> eagle:/results/r.h5) failed: permission denied" in failed.state_message


def test_offers_follow_capability_job_state_and_reconnects(alice, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=_slots())
    (parent,) = make_jobs(alice, make_app(alice, site.id), 1)
    child = _transfer_job(alice, app, parent_ids=[parent.id])
    assert child.state == JS.JOB_STATE_AWAITING_PARENTS
    ready = _transfer_job(alice, app)
    items = _items(alice, ready.id)

    # No "transfers" capability: no transfer work.
    plain = _connect(alice, site.id, site_clients, capabilities=("hooks",))
    work, _ = plain.barrier()
    assert not _transfer_work(work)
    plain.close()

    client = _connect(alice, site.id, site_clients)
    work, _ = client.barrier()
    # Only the READY job's stage-in: the child's inputs wait for its parents.
    assert set(_transfer_work(work)) == {f"transfer:{items['raw'].id}", f"transfer:{items['calib'].id}"}
    _report(client, "k:a", _item(items["raw"].id, T.TRANSFER_STATE_ACTIVE, task_id="t1"))
    _report(client, "k:d", _item(items["calib"].id, T.TRANSFER_STATE_DONE, task_id="t1"))

    # The parent finishes: the child becomes READY and its stage-in is offered without a poll.
    move(alice, parent.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    child_items = _items(alice, child.id)
    got = {client.next("work").id for _ in range(2)}
    assert got == {f"transfer:{child_items['raw'].id}", f"transfer:{child_items['calib'].id}"}

    # After a reconnect, everything unfinished is offered again: PENDING (queued at the old
    # stream's site) and ACTIVE (its task is tracked by the site), never DONE.
    client.close()
    again = _connect(alice, site.id, site_clients)
    work, _ = again.barrier()
    offered = _transfer_work(work)
    assert set(offered) == {f"transfer:{items['raw'].id}", f"transfer:{child_items['raw'].id}",
                            f"transfer:{child_items['calib'].id}"}
    active = offered[f"transfer:{items['raw'].id}"].start_transfers.items[0]
    assert (active.state, active.task_id) == (T.TRANSFER_STATE_ACTIVE, "t1")


def test_refused_reports(alice, bob, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=_slots())
    job = _transfer_job(alice, app)
    items = _items(alice, job.id)
    other_site = make_site(alice)
    client = _connect(alice, other_site.id, site_clients)
    # An item of another site.
    ack = _report(client, "k:x", _item(items["raw"].id, T.TRANSFER_STATE_DONE))
    assert any("not found at this site" in e for e in ack.errors)
    client.close()
    client = _connect(alice, site.id, site_clients)
    # Stage-out still waits for the job: the site may not start it.
    ack = _report(client, "k:y", _item(items["result"].id, T.TRANSFER_STATE_ACTIVE, task_id="t"))
    assert any("AWAITING_JOB" in e for e in ack.errors)
    # A transfer answer naming another item than its work id.
    ack = client.result(work_id=f"transfer:{items['raw'].id}",
                        transfers=pb.TransferUpdate(items=[_item(items["calib"].id, T.TRANSFER_STATE_DONE)]))
    assert any("other items" in e for e in ack.errors)
    # An unsolicited transfer update (no work id) is refused.
    ack = client.result(transfers=pb.TransferUpdate(items=[_item(items["raw"].id, T.TRANSFER_STATE_DONE)]))
    assert ack.errors
    assert get_job(alice, job.id).state == JS.JOB_STATE_READY
    assert {i.state for i in _items(alice, job.id).values()} == {T.TRANSFER_STATE_PENDING,
                                                                 T.TRANSFER_STATE_AWAITING_JOB}
    # A finished item ignores later reports (a stale ERROR after DONE changes nothing).
    _report(client, "k:z1", _item(items["raw"].id, T.TRANSFER_STATE_DONE))
    ack = _report(client, "k:z2", _item(items["raw"].id, T.TRANSFER_STATE_ERROR, error="late"))
    assert not ack.errors
    assert _items(alice, job.id)["raw"].state == T.TRANSFER_STATE_DONE


def test_user_retry_of_a_failed_item_is_offered_again(alice, site_clients):
    """ERROR -> PENDING by the user (UpdateTransferItem) wakes the stream; the item is
    offered again only while its job still waits for it."""
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=[app_pb2.TransferSlot(name="result", direction=OUT, local_path="r.h5")])
    (job,) = make_jobs(alice, app, 1, transfers={"result": "eagle:/r.h5"})
    client = _connect(alice, site.id, site_clients)
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    item_id = client.next("work").start_transfers.items[0].id
    # Report the item as failed but keep the job: the report arrives after the user killed
    # nothing; here the job fails, so a retry is not offered.
    _report(client, "k:e", _item(item_id, T.TRANSFER_STATE_ERROR, error="disk full"))
    assert get_job(alice, job.id).state == JS.JOB_STATE_FAILED
    stub = alice.stub(transfer_item_service_pb2_grpc.TransferServiceStub)
    stub.UpdateTransferItem(transfer_item_service_pb2.UpdateTransferItemRequest(
        transfer_item=T.TransferItem(id=item_id, state=T.TRANSFER_STATE_PENDING),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    work, _ = client.barrier()
    assert not _transfer_work(work)  # its job is FAILED: nothing waits for the item


def test_many_items_are_offered_within_credit(alice, site_clients):
    site = make_site(alice)
    app = make_app(alice, site.id, transfers=[app_pb2.TransferSlot(name="raw", direction=IN, local_path="raw")])
    jobs = make_jobs(alice, app, 30, transfers={"raw": f"aps:/d/{secrets.token_hex(2)}"})
    client = _connect(alice, site.id, site_clients, max_in_flight=8)
    work, _ = client.barrier()
    first = _transfer_work(work)
    assert len(first) == 8
    for wid, w in first.items():
        client.send(ack=pb.WorkAck(work_ids=[wid]))
        client.result(work_id=wid, transfers=pb.TransferUpdate(
            items=[_item(w.start_transfers.items[0].id, T.TRANSFER_STATE_PENDING)]))
    client.send(credit=pb.SiteCredit(items=8))
    work, _ = client.barrier()
    second = _transfer_work(work)
    assert len(second) == 8 and not set(second) & set(first)
    assert {j.state for j in jobs} == {JS.JOB_STATE_READY}
