"""Idempotency: the server does the work, its answer is lost (the proxy swallows the
response, then resets the connection), the SDK sees UNAVAILABLE and sends the same request
again (same request_id). Every mutation must have happened exactly once, and the retry
must get the first answer (not ALREADY_EXISTS, NOT_FOUND or FAILED_PRECONDITION from
doing it twice).

Each check counts what the server holds afterwards (rows and events), and asserts that a
response really was swallowed and the call really was sent again on a new connection."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balsam_grpc.sdk import Client
from tests.faults.conftest import database_url
from tests.faults.harness import Audit, ServerProc, job_events, passed_through
from tests.faults.report import record
from tests.support.proxy import Proxy

pytestmark = pytest.mark.timeout(120)
DROP_SECONDS = 0.5


@pytest.fixture
def world(backend: str, tmp_path: Path) -> Iterator[tuple[ServerProc, Proxy, Client, Client]]:
    server = ServerProc(tmp_path / "home", database_url(backend, tmp_path))
    server.start()
    proxy = Proxy(server.address)
    through = server.client(proxy.address)
    direct = server.client()
    through.wait_ready(20)
    yield server, proxy, through, direct
    through.close()
    direct.close()
    proxy.close()
    server.stop()


def lost_answer(proxy: Proxy, through: Client, call: Callable[[], Any]) -> Any:
    """`call()` with the server's answer to its first attempt swallowed."""
    through.wait_ready(20)
    swallowed, accepted = proxy.swallowed, proxy.accepted
    proxy.drop_responses(DROP_SECONDS)
    result = call()
    assert proxy.swallowed > swallowed, "no response was dropped: the fault did not happen"
    assert proxy.accepted > accepted, "the call was not sent again on a new connection"
    return result


def test_every_retried_mutation_happens_once(world, backend: str) -> None:
    _server, proxy, through, direct = world
    mutations: list[str] = []

    def once(name: str, call: Callable[[], Any], check: Callable[[Any], None]) -> Any:
        result = lost_answer(proxy, through, call)
        check(result)
        mutations.append(name)
        return result

    name = f"idem-{secrets.token_hex(3)}"
    site = once("CreateSite", lambda: through.sites.create(name=name, hostname="h", path="/p"),
                lambda s: assert_equal(direct.sites.filter(name=name).count(), 1))
    app = once("CreateApp", lambda: through.apps.create(site_id=site.id, name="echo", command_template="echo hi"),
               lambda a: assert_equal(direct.apps.filter(site_id=site.id).count(), 1))
    job = once("CreateJob", lambda: app.submit("one/1"),
               lambda j: assert_equal(direct.jobs.filter(site_id=site.id).count(), 1))

    from balsam_grpc.sdk import Job

    batch = [Job(_client=through, workdir=f"many/{i}", app_id=app.id, tags={"batch": "b"}) for i in range(5)]
    once("BatchCreateJobs", lambda: through.jobs.bulk_create(batch),
         lambda _: assert_equal(direct.jobs.filter(site_id=site.id, tags={"batch": "b"}).count(), 5))

    def save_data() -> Any:
        job.data = {"answer": 42}
        return job.save()

    once("UpdateJob (data)", save_data,
         lambda _: assert_equal(direct.jobs.get(id=job.id).data, {"answer": 42}))
    # A second KILLED would be an illegal transition (FAILED_PRECONDITION) if the retry ran again.
    once("UpdateJob (kill)", lambda: job.kill(),
         lambda _: assert_equal(count_into(direct, [job.id], "KILLED"), 1))
    once("BatchUpdateJobs (kill)", lambda: through.jobs.filter(site_id=site.id, tags={"batch": "b"}).update(
        state="KILLED"), lambda r: (assert_equal(r.ok, True),
                                    assert_equal(count_into(direct, [b.id for b in batch], "KILLED"), 5)))
    bj = once("CreateBatchJob", lambda: through.batch_jobs.create(site_id=site.id, num_nodes=1, wall_time_min=5,
                                                                  queue="q", project="p"),
              lambda _: assert_equal(direct.batch_jobs.filter(site_id=site.id).count(), 1))

    def withdraw() -> Any:
        bj.state = "PENDING_DELETION"
        return bj.save()

    once("UpdateBatchJob (state)", withdraw,
         lambda _: assert_equal(direct.batch_jobs.get(id=bj.id).state, "PENDING_DELETION"))
    # A retried delete of a deleted job would answer NOT_FOUND.
    once("DeleteJob", lambda: job.delete(), lambda _: assert_equal(direct.jobs.filter(id=job.id).count(), 0))
    once("BatchDeleteJobs", lambda: through.jobs.filter(site_id=site.id, tags={"batch": "b"}).delete(),
         lambda r: (assert_equal(r.ok, True), assert_equal(direct.jobs.filter(site_id=site.id).count(), 0)))
    once("UpdateSite", lambda: _rename(site, name + "-x"),
         lambda _: assert_equal(direct.sites.filter(name=name + "-x").count(), 1))
    record(f"responses dropped, SDK retries ({backend}): {len(mutations)} mutations", None,
           "each happened once", Audit(jobs=6))


def _rename(site: Any, new: str) -> Any:
    site.name = new
    return site.save()


def assert_equal(got: Any, want: Any) -> None:
    assert got == want, f"{got!r} != {want!r}"


def count_into(client: Client, ids: list[int], state: str) -> int:
    return sum(passed_through(e, state) for e in job_events(client, ids))
