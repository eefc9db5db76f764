"""The Globus backend through the transfer service, against registered responses
(globus_sdk.testing with the `responses` library: an unregistered URL fails, so no test
reaches the network).

Shown: batching (tasks of at most batch_size items, at most N in flight, paths mapped to
the collections), the submission id journaled before the submission and reused by the
retry after a crash (Globus answers "Duplicate" with the same task, never a second one),
success with figures, task failure, consent required (an error naming the login command,
not retried), an unreachable API (retried with backoff, then an error on every item,
nothing lost) and a task past its deadline (cancelled, error).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import requests
import responses
from globus_sdk.testing import (
    get_last_request,
    load_response,
    register_response_set,
)
from globus_sdk.transport import RetryConfig

from balsam_grpc.site.transfers.backends.globus import GlobusBackend
from balsam_grpc.site.transfers.config import (
    GlobusSettings,
    TransferSettings,
    parse_location,
)
from balsam_grpc.site.transfers.journal import TransferJournal
from balsam_grpc.site.transfers.model import NEW, SUBMITTED
from balsam_grpc.site.transfers.service import TransferService
from balsam_grpc.v1 import common_pb2, site_service_pb2, transfer_item_pb2

T = transfer_item_pb2
APS = "9a4d1e6c-1f2b-4c3d-8e5f-0a1b2c3d4e5f"
SITE_COLLECTION = "5b6c7d8e-1111-2222-3333-444455556666"
BASE = "https://transfer.api.globus.org/v0.10"

register_response_set("balsam_task_status", {
    "succeeded": {"service": "transfer", "path": "/v0.10/task/task-ok", "json": {
        "DATA_TYPE": "task", "task_id": "task-ok", "status": "SUCCEEDED", "bytes_transferred": 3000,
        "files_transferred": 3, "nice_status": None}},
    "failed": {"service": "transfer", "path": "/v0.10/task/task-bad", "json": {
        "DATA_TYPE": "task", "task_id": "task-bad", "status": "FAILED", "bytes_transferred": 0,
        "files_transferred": 0, "nice_status": "PERMISSION_DENIED",
        "fatal_error": {"code": "PERMISSION_DENIED", "description": "permission denied on /data/run1"}}},
    "active": {"service": "transfer", "path": "/v0.10/task/task-slow", "json": {
        "DATA_TYPE": "task", "task_id": "task-slow", "status": "ACTIVE", "bytes_transferred": 10,
        "files_transferred": 0, "nice_status": "Queued"}},
})


@pytest.fixture
def mocked() -> Iterator[None]:
    responses.start()
    try:
        yield
    finally:
        responses.stop()
        responses.reset()


def _submit_response(task_id: str, code: str = "Accepted") -> None:
    responses.add(responses.POST, f"{BASE}/transfer", json={
        "DATA_TYPE": "transfer_result", "code": code, "task_id": task_id, "submission_id": "echoed",
        "message": "ok", "request_id": "r", "resource": "/v0.10/transfer"}, status=202 if code == "Accepted" else 200)


def _submission_ids(n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for sid in ids:
        responses.add(responses.GET, f"{BASE}/submission_id", json={"value": sid})
    return ids


def _calls(path: str, method: str = "") -> list[Any]:
    return [c for c in responses.calls if c.request.url.split("?")[0].endswith(path)
            and (not method or c.request.method == method)]


class Harness:
    """A TransferService with the Globus backend on a mocked TransferClient, run on a
    private event loop until a condition holds."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        self.data = tmp / "site" / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        globus = GlobusSettings(local_collection=SITE_COLLECTION, path_map={str(self.data): "/balsam/data"},
                                sync_level="mtime", verify_checksum=True)
        defaults = dict(batch_size=2, batch_linger_s=0.0, max_tasks_per_location=2, poll_seconds=0.05,
                        api_attempts=3, api_backoff_s=0.01, task_deadline_s=60.0, globus=globus)
        self.settings = TransferSettings(**{**defaults, **settings})
        self.journal_path = tmp / "site" / "state" / "transfers.sqlite"
        self.reports: list[site_service_pb2.WorkResult] = []
        self.service = self._service()

    def _service(self) -> TransferService:
        client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("token"),
                                           retry_config=RetryConfig(max_retries=0))
        location = parse_location("aps", f"globus://{APS}/")

        def backend(loc: Any) -> GlobusBackend:
            return GlobusBackend(location, self.settings.globus, client_factory=lambda: client,
                                 site_dir=self.tmp / "site")

        return TransferService(settings=self.settings, locations={"aps": f"globus://{APS}/"}, data_dir=self.data,
                               journal=TransferJournal(self.journal_path), report=self.reports.append,
                               backend_factory=backend)

    def restart(self) -> None:
        """A new service on the same journal (the daemon after a crash)."""
        self.service.journal.close()
        self.reports = []
        self.service = self._service()

    def items(self, n: int, direction: int = common_pb2.TRANSFER_DIRECTION_IN) -> list[T.TransferItem]:
        return [T.TransferItem(id=i + 1, job_id=100 + i, direction=direction, slot="raw", location_alias="aps",
                               remote_path=f"/data/run{i}.h5", local_path="raw.h5", job_workdir=f"w{i}",
                               state=T.TRANSFER_STATE_PENDING) for i in range(n)]

    def states(self) -> dict[int, T.TransferItem]:
        """The latest reported state of every item."""
        out: dict[int, T.TransferItem] = {}
        for r in self.reports:
            for item in r.transfers.items:
                out[item.id] = item
        return out

    def run(self, until: Callable[[], bool], *, accept: list[T.TransferItem] = (), timeout: float = 10.0,
            crash_after: Callable[[], bool] | None = None) -> list[T.TransferItem]:
        async def main() -> list[T.TransferItem]:
            answers = list((await self.service.accept(list(accept))).transfers.items) if accept else []
            runner = asyncio.create_task(self.service.run())
            deadline = asyncio.get_running_loop().time() + timeout
            stop = crash_after or until
            while not stop():
                assert asyncio.get_running_loop().time() < deadline, f"timed out; reports: {self.reports}"
                assert not runner.done(), runner.exception()
                await asyncio.sleep(0.01)
            runner.cancel()  # for crash_after: the process dies here, nothing more is written
            await asyncio.gather(runner, return_exceptions=True)
            return answers

        return asyncio.run(main())


def _final(h: Harness, n: int) -> Callable[[], bool]:
    return lambda: len([i for i in h.states().values()
                        if i.state in (T.TRANSFER_STATE_DONE, T.TRANSFER_STATE_ERROR)]) >= n


def test_batches_paths_and_success(tmp_path, mocked):
    h = Harness(tmp_path)
    sids = _submission_ids(3)
    for task_id in ("task-ok", "task-ok", "task-ok"):
        _submit_response(task_id)
    load_response("balsam_task_status", case="succeeded")
    answers = h.run(_final(h, 5), accept=h.items(5))
    assert [a.state for a in answers] == [T.TRANSFER_STATE_PENDING] * 5  # queued at the site

    submits = _calls("/transfer", "POST")
    bodies = [json.loads(c.request.body) for c in submits]
    assert sorted(len(b["DATA"]) for b in bodies) == [1, 2, 2]  # batch_size 2
    assert sorted(b["submission_id"] for b in bodies) == sorted(sids)
    first = next(b for b in bodies if any(d["source_path"] == "/data/run0.h5" for d in b["DATA"]))
    assert (first["source_endpoint"], first["destination_endpoint"]) == (APS, SITE_COLLECTION)
    assert first["sync_level"] == 2 or first["sync_level"] == "mtime"
    assert first["verify_checksum"] is True
    entry = next(d for d in first["DATA"] if d["source_path"] == "/data/run0.h5")
    assert entry["destination_path"] == "/balsam/data/w0/raw.h5"  # the site path mapped to the collection
    assert entry["recursive"] is False

    states = h.states()
    assert {i.state for i in states.values()} == {T.TRANSFER_STATE_DONE}
    assert {i.task_id for i in states.values()} == {"task-ok"}
    # Task figures spread over its items: every task reported 3000 bytes / 3 files.
    two = [i for i in states.values() if i.id in (1, 2)]
    assert sum(i.metrics.bytes for i in two) == 3000 and sum(i.metrics.files for i in two) == 3
    # ACTIVE reported before DONE for every item.
    active = [r for r in h.reports if r.work_id.endswith(":active")]
    assert sum(len(r.transfers.items) for r in active) == 5


def test_in_flight_limit_per_location(tmp_path, mocked):
    h = Harness(tmp_path, batch_size=1, max_tasks_per_location=2)
    _submission_ids(3)
    for _ in range(3):
        _submit_response("task-slow")
    load_response("balsam_task_status", case="active")
    h.run(lambda: len(_calls("/task/task-slow")) >= 5, accept=h.items(3))
    assert len(_calls("/transfer", "POST")) == 2  # the third item waits for a free slot
    assert len(h.service.queued) == 1


def test_submission_id_journaled_first_and_reused_after_a_crash(tmp_path, mocked):
    h = Harness(tmp_path, api_attempts=50, api_backoff_s=5.0)
    (sid,) = _submission_ids(1)
    responses.add(responses.POST, f"{BASE}/transfer", body=requests.ConnectionError("connection reset"))
    # Crash after the first submission attempt: the id is in the journal, the task is NEW.
    h.run(lambda: False, accept=h.items(1), crash_after=lambda: len(_calls("/transfer", "POST")) >= 1)
    (task,) = h.service.journal.open_tasks()
    assert (task.state, task.submission_id) == (NEW, sid)

    # The restarted daemon submits again with the SAME id; Globus recognises it.
    h.restart()
    responses.replace(responses.POST, f"{BASE}/transfer", json={
        "DATA_TYPE": "transfer_result", "code": "Duplicate", "task_id": "task-ok", "submission_id": sid,
        "message": "duplicate", "request_id": "r", "resource": "/v0.10/transfer"})
    load_response("balsam_task_status", case="succeeded")
    h.run(_final(h, 1))
    assert len(_calls("/submission_id")) == 1  # never a second id
    posts = _calls("/transfer", "POST")
    assert {json.loads(c.request.body)["submission_id"] for c in posts} == {sid}
    assert h.states()[1].state == T.TRANSFER_STATE_DONE and h.states()[1].task_id == "task-ok"
    assert h.service.journal.task_of_item(1).state == "done"


def test_submitted_task_is_polled_not_resubmitted_after_restart(tmp_path, mocked):
    h = Harness(tmp_path)
    _submission_ids(1)
    _submit_response("task-slow")
    load_response("balsam_task_status", case="active")
    h.run(lambda: any(r.work_id.endswith(":active") for r in h.reports), accept=h.items(1))
    (task,) = h.service.journal.open_tasks()
    assert (task.state, task.task_id) == (SUBMITTED, "task-slow")
    posts = len(_calls("/transfer", "POST"))
    h.restart()
    # The server offers the ACTIVE item again after the reconnect: answered from the journal.
    item = h.items(1)[0]
    item.state, item.task_id = T.TRANSFER_STATE_ACTIVE, "task-slow"
    polls = len(_calls("/task/task-slow"))
    answers = h.run(lambda: len(_calls("/task/task-slow")) > polls + 2, accept=[item])
    assert (answers[0].state, answers[0].task_id) == (T.TRANSFER_STATE_ACTIVE, "task-slow")
    assert len(_calls("/transfer", "POST")) == posts


def test_lost_journal_adopts_the_task_instead_of_starting_another(tmp_path, mocked):
    h = Harness(tmp_path)
    load_response("balsam_task_status", case="succeeded")
    item = h.items(1)[0]
    item.state, item.task_id = T.TRANSFER_STATE_ACTIVE, "task-ok"
    answers = h.run(_final(h, 1), accept=[item])
    assert answers[0].state == T.TRANSFER_STATE_ACTIVE
    assert not _calls("/transfer", "POST") and not _calls("/submission_id")
    assert h.states()[1].state == T.TRANSFER_STATE_DONE


def test_failed_task_fails_its_items(tmp_path, mocked):
    h = Harness(tmp_path)
    _submission_ids(1)
    _submit_response("task-bad")
    load_response("balsam_task_status", case="failed")
    h.run(_final(h, 2), accept=h.items(2))
    for item in h.states().values():
        assert item.state == T.TRANSFER_STATE_ERROR
        assert "task-bad failed: permission denied on /data/run1" in item.error


def test_consent_required_names_the_login_command(tmp_path, mocked):
    h = Harness(tmp_path)
    _submission_ids(1)
    scope = f"urn:globus:auth:scope:transfer.api.globus.org:all[*https://auth.globus.org/scopes/{APS}/data_access]"
    responses.add(responses.POST, f"{BASE}/transfer", status=403, json={
        "code": "ConsentRequired", "message": "Missing required data_access consent", "request_id": "r",
        "resource": "/v0.10/transfer", "required_scopes": [scope]})
    h.run(_final(h, 1), accept=h.items(1))
    error = h.states()[1].error
    assert h.states()[1].state == T.TRANSFER_STATE_ERROR
    assert "ConsentRequired" in error and "balsamctl site globus-login" in error and "--scope" in error
    assert scope in error
    assert len(_calls("/transfer", "POST")) == 1  # not retried: it needs the user
    assert get_last_request().method == "POST"


def test_unreachable_api_is_retried_then_fails_the_items(tmp_path, mocked):
    h = Harness(tmp_path, api_attempts=3)
    responses.add(responses.GET, f"{BASE}/submission_id", body=requests.ConnectionError("no route to host"))
    h.run(_final(h, 3), accept=h.items(3))
    assert len(_calls("/submission_id")) == 3 * 2  # two tasks (batch_size 2), three attempts each
    states = h.states()
    assert set(states) == {1, 2, 3}  # nothing lost: every item has its answer
    for item in states.values():
        assert item.state == T.TRANSFER_STATE_ERROR
        assert "Globus unreachable" in item.error and "gave up after 3 attempts" in item.error
    assert not h.service.journal.open_tasks()


def test_unreachable_during_polling_then_back(tmp_path, mocked):
    h = Harness(tmp_path)
    _submission_ids(1)
    _submit_response("task-ok")
    responses.add(responses.GET, f"{BASE}/task/task-ok", body=requests.ConnectionError("timeout"))
    responses.add(responses.GET, f"{BASE}/task/task-ok", body=requests.ConnectionError("timeout"))
    load_response("balsam_task_status", case="succeeded")
    h.run(_final(h, 1), accept=h.items(1))
    assert h.states()[1].state == T.TRANSFER_STATE_DONE
    assert len(_calls("/task/task-ok")) >= 3


def test_deadline_cancels_and_fails(tmp_path, mocked):
    h = Harness(tmp_path, task_deadline_s=0.3)
    _submission_ids(1)
    _submit_response("task-slow")
    load_response("balsam_task_status", case="active")
    responses.add(responses.POST, f"{BASE}/task/task-slow/cancel", json={
        "DATA_TYPE": "result", "code": "Canceled", "message": "ok", "request_id": "r", "resource": "/task/cancel"})
    h.run(_final(h, 1), accept=h.items(1))
    item = h.states()[1]
    assert item.state == T.TRANSFER_STATE_ERROR
    assert "did not finish within 0.3 s" in item.error and "Queued" in item.error
    assert _calls("/task/task-slow/cancel", "POST")


def test_unknown_location_fails_at_once(tmp_path, mocked):
    h = Harness(tmp_path)
    item = h.items(1)[0]
    item.location_alias = "nowhere"
    answers = h.run(lambda: True, accept=[item])
    assert answers[0].state == T.TRANSFER_STATE_ERROR
    assert "location 'nowhere' is not in transfer_locations" in answers[0].error
    assert not responses.calls
