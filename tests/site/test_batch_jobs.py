"""BatchJobs against a fake scheduler adapter: submit once (journal), refusals with the
scheduler's message, queue limits, state mirroring with times, recovery after a restart,
and exactly-once submission across a crash between the scheduler accepting a pilot and the
journal recording it (simulated deterministically: the adapter accepts, then the "daemon"
dies before anything after the call runs). The same crash against the real `local`
adapter is here too; against the real Slurm it is in test_slurm_real.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from balsam_grpc.site.batch import BatchJobs
from balsam_grpc.site.journal import Journal, SubmitIntent, SubmittedJob
from balsam_grpc.site.schedulers import SchedulerJob, SubmitError
from balsam_grpc.site.settings import QueueLimits, SiteSettings
from balsam_grpc.v1 import batch_job_pb2

BJ = batch_job_pb2


class Crash(BaseException):
    """kill -9 of the daemon: nothing after the point it is raised at runs (a BaseException,
    so no `except Exception` in the code under test can swallow it)."""


class FakeScheduler:
    def __init__(self):
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.states: dict[str, SchedulerJob] = {}
        self.names: dict[str, str] = {}
        self.refuse = ""
        self.crash = ""        # "before": die before the scheduler sees the job; "after": once it holds it
        self.timeout = False   # the submit command times out after the scheduler took the job
        self.lookup_unknown = 0  # how many lookups answer None (scheduler cannot say)
        self.lookups: list[str] = []

    async def submit(self, script_path, *, project, queue, num_nodes, wall_time_min, job_name, cwd):
        assert script_path.exists() and "launcher" in script_path.read_text()
        if self.crash == "before":
            raise Crash
        if self.refuse:
            raise SubmitError(self.refuse)
        sid = str(100 + len(self.submitted))
        self.submitted.append(sid)
        self.states[sid] = SchedulerJob(sid, "queued", queue=queue, name=job_name)
        self.names[sid] = job_name
        if self.crash == "after":
            raise Crash
        if self.timeout:
            raise SubmitError("sbatch did not answer within 30 s (the job may still have been queued)",
                              maybe_submitted=True)
        return sid

    async def find_by_name(self, name, *, submitted_after=None):
        self.lookups.append(name)
        if self.lookup_unknown:
            self.lookup_unknown -= 1
            return None
        return [self.states[sid] for sid, n in self.names.items() if n == name]

    async def statuses(self, ids):
        return {i: self.states[i] for i in ids if i in self.states}

    async def cancel(self, sid):
        self.cancelled.append(sid)

    async def backfill_windows(self):
        return []


def make(tmp_path, scheduler=None, **settings):
    sent, snaps = [], []
    s = SiteSettings(site_id=1, name="t", allowed_queues={"debug": QueueLimits(max_nodes=4, max_queued=2)},
                     **settings)
    jobs = BatchJobs(settings=s, scheduler=scheduler or FakeScheduler(), journal=Journal(tmp_path / "j.json"),
                     qsubmit_dir=tmp_path, render=lambda bj: f"#!/bin/sh\nlauncher {bj.id}\n",
                     send_update=lambda r: sent.append(r) or True, send_snapshot=lambda x: snaps.append(x) or True)
    jobs.find_delays_s = (0, 0)  # lookups the scheduler cannot answer: retried at once, twice
    return jobs, sent, snaps


def bj(i, **kw):
    return BJ.BatchJob(id=i, site_id=1, num_nodes=2, wall_time_min=10, queue="debug", **kw)


def test_submit_once_even_when_offered_again(tmp_path):
    jobs, _, _ = make(tmp_path)
    first = asyncio.run(jobs.submit(bj(1))).batch_job
    assert first.state == BJ.BATCH_JOB_STATE_QUEUED and first.scheduler_id == "100"
    assert (tmp_path / "batch-1.sh").stat().st_mode & 0o077 == 0  # the script carries a token
    # A restarted daemon (new BatchJobs, same journal) offered "submit:1" again.
    again, _, _ = make(tmp_path, scheduler=jobs.scheduler)
    second = asyncio.run(again.submit(bj(1))).batch_job
    assert second.scheduler_id == "100" and jobs.scheduler.submitted == ["100"]


def test_refusals_carry_the_reason(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.refuse = "sbatch: error: Batch job submission failed: Invalid account"
    r = asyncio.run(jobs.submit(bj(1))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "Invalid account" in r.status_info
    sched.refuse = ""
    r = asyncio.run(jobs.submit(BJ.BatchJob(id=2, num_nodes=9, wall_time_min=5, queue="debug"))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "9 nodes exceed" in r.status_info
    asyncio.run(jobs.submit(bj(3)))
    asyncio.run(jobs.submit(bj(4)))
    r = asyncio.run(jobs.submit(bj(5))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "max_queued = 2" in r.status_info


def test_states_mirrored_with_times_and_snapshot(tmp_path):
    sched = FakeScheduler()
    jobs, sent, snaps = make(tmp_path, sched)
    asyncio.run(jobs.submit(bj(1)))
    assert asyncio.run(jobs.poll()) == 0 and snaps[-1].queues[0].queued_jobs == 1
    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    sched.states["100"] = SchedulerJob("100", "running", start_time=start)
    assert asyncio.run(jobs.poll()) == 1
    running = sent[-1].batch_job
    assert running.state == BJ.BATCH_JOB_STATE_RUNNING and running.start_time.ToDatetime(UTC) == start
    assert asyncio.run(jobs.still_queued(1)) is False
    sched.states["100"] = SchedulerJob("100", "failed", message="NODE_FAIL")
    assert asyncio.run(jobs.poll()) == 1
    end = sent[-1].batch_job
    assert end.state == BJ.BATCH_JOB_STATE_FINISHED and end.HasField("end_time") and "NODE_FAIL" in end.status_info
    assert jobs.tracked == {} and jobs.journal.submitted(1) is None  # done: forgotten


def test_unknown_answers_change_nothing(tmp_path):
    sched = FakeScheduler()
    jobs, sent, _ = make(tmp_path, sched)
    asyncio.run(jobs.submit(bj(1)))

    async def unknown(ids):
        return None
    sched.statuses = unknown
    assert asyncio.run(jobs.poll()) == 0 and sent == []


def test_reconcile_resends_what_the_server_missed(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    asyncio.run(jobs.submit(bj(1)))
    sched.states["100"] = SchedulerJob("100", "running")
    restarted, sent, _ = make(tmp_path, sched)
    # The server never got the QUEUED result (daemon killed before the ack).
    restarted.reconcile([bj(1, state=BJ.BATCH_JOB_STATE_PENDING_SUBMISSION)])
    asyncio.run(restarted.poll())
    assert [r.batch_job.state for r in sent] == [BJ.BATCH_JOB_STATE_RUNNING]
    assert sent[0].batch_job.scheduler_id == "100"


def test_cancel(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    asyncio.run(jobs.submit(bj(1)))
    r = asyncio.run(jobs.cancel(bj(1, state=BJ.BATCH_JOB_STATE_PENDING_DELETION))).batch_job
    assert sched.cancelled == ["100"] and r.state == BJ.BATCH_JOB_STATE_FINISHED and 1 not in jobs.tracked
    r = asyncio.run(jobs.cancel(bj(2))).batch_job
    assert r.status_info == "cancelled before submission" and sched.cancelled == ["100"]


# --- exactly once across a crash mid-submit ----------------------------------------------------
def crash_during(jobs, batch_job):
    try:
        asyncio.run(jobs.submit(batch_job))
    except Crash:
        return
    raise AssertionError("the simulated crash did not happen")


def test_crash_after_the_scheduler_accepted_adopts_the_job(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.crash = "after"
    crash_during(jobs, bj(1))
    # On disk: the intent with the pilot's name, no scheduler id (the crash came first).
    on_disk = Journal(tmp_path / "j.json")
    assert on_disk.submitted(1) is None and on_disk.intent(1).job_name == "balsam-t-1"
    assert sched.submitted == ["100"] and sched.names["100"] == "balsam-t-1"
    # The restarted daemon is offered "submit:1" again (the result never reached the server).
    sched.crash = ""
    restarted, _, _ = make(tmp_path, sched)
    r = asyncio.run(restarted.submit(bj(1))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_QUEUED and r.scheduler_id == "100"
    assert "found in the scheduler as balsam-t-1" in r.status_info
    assert sched.submitted == ["100"]  # exactly one submission
    assert sched.lookups == ["balsam-t-1"]
    again = Journal(tmp_path / "j.json")
    assert again.submitted(1).scheduler_id == "100" and again.intent(1) is None
    assert restarted.tracked[1].scheduler_id == "100"
    # And a third offer is answered from the journal, without asking the scheduler.
    third, _, _ = make(tmp_path, sched)
    assert asyncio.run(third.submit(bj(1))).batch_job.scheduler_id == "100"
    assert sched.submitted == ["100"] and len(sched.lookups) == 1


def test_crash_before_the_scheduler_saw_it_submits_once(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.crash = "before"
    crash_during(jobs, bj(1))
    assert Journal(tmp_path / "j.json").intent(1) is not None and sched.submitted == []
    sched.crash = ""
    restarted, _, _ = make(tmp_path, sched)
    r = asyncio.run(restarted.submit(bj(1))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_QUEUED and r.scheduler_id == "100" and r.status_info == "submitted"
    assert sched.submitted == ["100"] and sched.lookups == ["balsam-t-1"]
    assert Journal(tmp_path / "j.json").intent(1) is None


def test_scheduler_that_cannot_answer_leaves_the_work_unanswered(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.crash = "after"
    crash_during(jobs, bj(1))
    sched.crash = ""
    sched.lookup_unknown = 3  # every lookup of this offer (1 + 2 retries) says "cannot tell"
    restarted, _, _ = make(tmp_path, sched)
    assert asyncio.run(restarted.submit(bj(1))) is None  # neither QUEUED nor SUBMIT_FAILED
    assert sched.submitted == ["100"] and len(sched.lookups) == 3
    assert Journal(tmp_path / "j.json").intent(1) is not None  # kept for the next offer
    # Offered again after a reconnect, with the scheduler back: adopted, still one job.
    r = asyncio.run(restarted.submit(bj(1))).batch_job
    assert r.scheduler_id == "100" and sched.submitted == ["100"]


def test_submit_timeout_with_the_job_accepted_is_adopted(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.timeout = True
    r = asyncio.run(jobs.submit(bj(1))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_QUEUED and r.scheduler_id == "100" and sched.submitted == ["100"]
    assert jobs.journal.submitted(1).scheduler_id == "100"


def test_submit_timeout_without_a_job_is_a_failure_and_leaves_no_intent(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)

    async def times_out(script_path, **kw):
        raise SubmitError("sbatch did not answer within 30 s", maybe_submitted=True)
    sched.submit = times_out
    r = asyncio.run(jobs.submit(bj(1))).batch_job
    assert r.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "did not answer" in r.status_info
    assert jobs.journal.intent(1) is None and sched.lookups == ["balsam-t-1"]


def test_refusal_leaves_no_intent(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.refuse = "sbatch: error: invalid partition"
    assert asyncio.run(jobs.submit(bj(1))).batch_job.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED
    assert jobs.journal.intent(1) is None and jobs.journal.submitted(1) is None


def test_cancel_during_an_interrupted_submission_cancels_the_found_job(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.crash = "after"
    crash_during(jobs, bj(1))
    restarted, _, _ = make(tmp_path, sched)
    r = asyncio.run(restarted.cancel(bj(1, state=BJ.BATCH_JOB_STATE_PENDING_DELETION))).batch_job
    assert sched.cancelled == ["100"] and r.scheduler_id == "100" and r.status_info == "cancelled"
    assert Journal(tmp_path / "j.json").intent(1) is None


def test_reconcile_drops_intents_of_batch_jobs_gone_from_the_server(tmp_path):
    sched = FakeScheduler()
    jobs, _, _ = make(tmp_path, sched)
    sched.crash = "before"
    crash_during(jobs, bj(1))
    crash_during(jobs, bj(2))
    restarted, _, _ = make(tmp_path, sched)
    restarted.reconcile([bj(2, state=BJ.BATCH_JOB_STATE_PENDING_SUBMISSION)])
    assert restarted.journal.intent_ids() == [2]


def test_real_local_scheduler_crash_after_accept_is_adopted(tmp_path):
    """The same crash with the real `local` adapter: its job record (holding the name) is
    what a restarted daemon finds."""
    from balsam_grpc.site.schedulers import get_scheduler

    local = get_scheduler("local", state_dir=str(tmp_path / "local-state"), seconds_per_minute=1.0)

    class DiesAfterAccept:
        """The real adapter; the daemon "dies" the moment it returns the id."""

        def __init__(self, inner):
            self.inner = inner
            self.crash = True

        async def submit(self, *a, **kw):
            sid = await self.inner.submit(*a, **kw)
            if self.crash:
                raise Crash
            return sid

        def __getattr__(self, name):
            return getattr(self.inner, name)

    sched = DiesAfterAccept(local)
    jobs, _, _ = make(tmp_path, sched)
    crash_during(jobs, bj(7))
    records = list((tmp_path / "local-state").glob("*.json"))
    assert len(records) == 1
    sched.crash = False
    restarted, _, _ = make(tmp_path, sched)
    r = asyncio.run(restarted.submit(bj(7))).batch_job
    try:
        assert r.state == BJ.BATCH_JOB_STATE_QUEUED and r.scheduler_id == records[0].stem
        assert len(list((tmp_path / "local-state").glob("*.json"))) == 1  # no second job
        found = asyncio.run(local.find_by_name("balsam-t-7"))
        assert [j.scheduler_id for j in found] == [r.scheduler_id] and found[0].name == "balsam-t-7"
    finally:
        asyncio.run(local.cancel(r.scheduler_id or records[0].stem))


# --- the journal -------------------------------------------------------------------------------
def test_journal_reads_the_format_before_intents_and_survives_corruption(tmp_path):
    import json

    path = tmp_path / "journal.json"
    path.write_text(json.dumps({"submitted": {"3": {"scheduler_id": "42", "submit_time": 1.0, "script": "s"}},
                                "pilots": {"3": "elastic"}}))
    old = Journal(path)
    assert old.submitted(3).scheduler_id == "42" and old.intent_ids() == [] and old.pilot_requests() == []
    old.record_intent(4, SubmitIntent("balsam-t-4", 2.0, "batch-4.sh"))
    old.record_submit(4, SubmittedJob("43", 3.0))
    again = Journal(path)
    assert again.intent(4) is None and again.submitted(4).scheduler_id == "43" and again.pilot_origin(3) == "elastic"
    path.write_text('{"intents": {"5": {"job_name": 1}}, "submitted": 7}')  # wrong shapes
    assert Journal(path).submitted_ids() == [] and path.with_suffix(".corrupt").exists()
