"""Completion prediction for routing: the pure estimation functions (no server) and
the policies built on them (earliest, deadline, shortest_backlog)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from balsam_grpc.sdk import InvalidArgument
from balsam_grpc.sdk.routing import (
    Estimate,
    LinearModel,
    Prediction,
    SiteHistory,
    SiteLoad,
    calibrated_margin,
    choose_earliest,
    choose_for_deadline,
    choose_shortest_backlog,
    estimate,
    estimates,
    fit_linear,
    pooled,
    prediction_excesses,
    quantile,
    slot_wait_s,
)

MB = 1e6


def test_fit_linear_recovers_a_size_dependence_and_falls_back_to_the_median():
    line = fit_linear([(b * MB, 2.0 + 0.5 * b) for b in (1, 2, 4, 8)])
    assert line.fixed_s == pytest.approx(2.0) and line.per_byte_s == pytest.approx(0.5 / MB)
    assert line.seconds(10 * MB) == pytest.approx(7.0) and line.error_s == pytest.approx(0.0)
    same_size = fit_linear([(MB, 3.0), (MB, 5.0), (MB, 4.0)])
    assert same_size.per_byte_s == 0.0 and same_size.fixed_s == 4.0 and same_size.error_s == 1.0
    # A rate measured by the transfer tasks: only the fixed overhead is fitted.
    rated = fit_linear([(MB, 1.5), (MB, 1.7)], per_byte_s=1.0 / (10 * MB))
    assert rated.bytes_per_s == pytest.approx(10 * MB) and rated.fixed_s == pytest.approx(1.5)
    assert fit_linear([]) is None


def test_slot_wait_free_slot_held_slots_and_a_new_pilot():
    idle = SiteLoad(1, held_nodes=2, running_jobs=1)
    assert slot_wait_s(idle, placed=0, run_s=10, pilot_delay_s=100) == 0.0
    full = SiteLoad(1, held_nodes=2, running_jobs=2, backlog_jobs=2, node_capacity=2)
    # No room for a pilot: the 3rd job behind 4 on 2 slots starts after 1.5 runs.
    assert slot_wait_s(full, placed=0, run_s=10, pilot_delay_s=5) == pytest.approx(15.0)
    roomy = SiteLoad(1, held_nodes=2, running_jobs=2, backlog_jobs=2, node_capacity=8)
    assert slot_wait_s(roomy, placed=0, run_s=10, pilot_delay_s=5) == pytest.approx(5.0)  # the pilot comes first
    assert slot_wait_s(roomy, placed=0, run_s=10, pilot_delay_s=60) == pytest.approx(15.0)  # the slots free first
    cold = SiteLoad(1, node_capacity=4)  # nothing held yet: a pilot must start
    assert slot_wait_s(cold, placed=0, run_s=10, pilot_delay_s=30) == pytest.approx(30.0)
    assert slot_wait_s(cold, placed=6, run_s=10, pilot_delay_s=30) == pytest.approx(30 + 3 / 4 * 10)


def test_estimate_adds_the_terms_and_overlaps_stage_in_with_the_wait():
    history = SiteHistory(1, stage_in=LinearModel(1.0, 1 / (10 * MB), 5, 0.3),
                          stage_out=LinearModel(0.5, 0.0, 5, 0.4), run=LinearModel(2.0, 1 / MB, 5, 1.2),
                          pilot_delay_s=20.0, charge_per_node_hour=2.0)
    est = estimate(SiteLoad(1, held_nodes=1, running_jobs=1, node_capacity=1), history,
                   input_bytes=8 * MB, output_bytes=1000)
    assert est.stage_in_s == pytest.approx(1.8) and est.run_s == pytest.approx(10.0)
    assert est.wait_s == pytest.approx(10.0)              # behind the one running job
    assert est.total_s == pytest.approx(10.0 + 10.0 + 0.5)  # stage-in hides in the wait
    assert est.error_s == pytest.approx((0.3**2 + 1.2**2 + 0.4**2) ** 0.5)
    assert est.cost == pytest.approx(10.0 / 3600 * 2.0) and est.borrowed == ()


def test_the_dispatch_gap_adds_to_each_slot_turnover():
    history = SiteHistory(1, run=LinearModel(2.0), pilot_delay_s=0.0, dispatch_s=1.5)
    one_slot = SiteLoad(1, held_nodes=1, node_capacity=1, running_jobs=1, backlog_jobs=3)
    # Four jobs ahead of it on one slot, each holding the slot 2 s + 1.5 s, then its own dispatch.
    assert estimate(one_slot, history).wait_s == pytest.approx(4 * 3.5 + 1.5)


def test_dispatch_gaps_count_only_jobs_that_waited_for_the_freed_slot():
    from datetime import datetime, timedelta

    from balsam_grpc.sdk.analytics import JobTimeline
    from balsam_grpc.sdk.routing import dispatch_gaps

    t0 = datetime(2026, 1, 1)

    def life(site, runnable, start, done):
        at = {"PREPROCESSED": t0 + timedelta(seconds=runnable), "RUNNING": t0 + timedelta(seconds=start),
              "RUN_DONE": t0 + timedelta(seconds=done)}
        return JobTimeline(site, first_entry=dict(at), last_entry=dict(at))
    lives = [life(1, 0, 0, 10), life(1, 1, 12, 20),   # waited for the first: 2 s gap
             life(1, 30, 31, 35),                     # runnable after the slot freed: no sample
             life(2, 0, 0, 5), life(2, 0, 6, 9)]
    assert dispatch_gaps(lives) == {1: [2.0], 2: [1.0]}


def test_a_site_without_history_borrows_the_pooled_history():
    known = SiteHistory(1, stage_in=LinearModel(1.0), run=LinearModel(30.0), stage_out=LinearModel(1.0),
                        pilot_delay_s=10.0)
    new = estimate(SiteLoad(2, node_capacity=2), SiteHistory(2), pooled([known]))
    assert new.run_s == 30.0 and new.wait_s == 1.0 + 10.0  # staged in, then the pilot is asked for
    assert set(new.borrowed) == {"stage_in", "run", "stage_out", "pilot_delay"}


def test_earliest_prefers_a_short_queue_over_a_big_site_waiting_for_its_pilot():
    """The big site gets its capacity's share from `best`; predicted completion sees
    that its pilot is 300 s away while the small site's node is free."""
    run = LinearModel(20.0)
    loads = [SiteLoad(1, node_capacity=8), SiteLoad(2, held_nodes=1, node_capacity=1)]
    histories = {1: SiteHistory(1, run=run, pilot_delay_s=300.0), 2: SiteHistory(2, run=run, pilot_delay_s=5.0)}
    placed: Counter[int] = Counter()
    for _ in range(6):
        placed[choose_earliest(estimates(loads, histories, placed)).site_id] += 1
    # Site 2 serves jobs every 20 s: five of them are done before the big site's pilot starts.
    assert placed[2] == 6


def test_deadline_picks_the_cheapest_site_that_meets_it_and_flags_misses():
    fast_dear = Estimate(1, 1, 0, 10, 1, error_s=1, cost=2.0, spread_s=1.0, cost_high=2.0)
    slow_cheap = Estimate(2, 1, 40, 10, 1, error_s=1, cost=1.0, spread_s=8.0, cost_high=1.0)
    assert choose_for_deadline([fast_dear, slow_cheap], deadline_s=60) == (slow_cheap, False)
    assert choose_for_deadline([fast_dear, slow_cheap], deadline_s=30) == (fast_dear, False)
    # Typical completion 51 s, but 59 s at the high quantile: not counted as meeting 55 s.
    assert choose_for_deadline([fast_dear, slow_cheap], deadline_s=55) == (fast_dear, False)
    assert choose_for_deadline([fast_dear, slow_cheap], deadline_s=5) == (fast_dear, True)
    # Costs that differ by run-time noise alone are one price: the earlier site wins.
    noisy = Estimate(3, 1, 40, 9.5, 1, error_s=1, cost=1.9)
    assert choose_for_deadline([fast_dear, noisy], deadline_s=60) == (fast_dear, False)
    with pytest.raises(InvalidArgument):
        choose_for_deadline([], 10)


def test_costs_within_the_run_time_spread_are_one_price():
    """Same charge everywhere: site 2 looks 30 % cheaper only because its typical run is
    shorter, but its slow runs cost as much as site 1's typical one: no cheaper at all."""
    early = Estimate(1, 0, 0, 10, 0, error_s=0, cost=10.0, cost_high=12.0)
    late_cheap = Estimate(2, 0, 10, 7, 0, error_s=0, cost=7.0, cost_high=10.5)
    assert choose_for_deadline([early, late_cheap], deadline_s=60)[0] is early
    surely_cheap = replace(late_cheap, cost_high=7.5)
    assert choose_for_deadline([early, surely_cheap], deadline_s=60)[0] is surely_cheap


def test_quantile_interpolates_and_tends_to_the_largest_of_few_samples():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile(list(range(11)), 0.9) == pytest.approx(9.0)
    assert quantile([1.0, 5.0], 0.9) == pytest.approx(4.6)
    assert quantile([7.0]) == 7.0
    with pytest.raises(ValueError):
        quantile([])


def test_fit_linear_keeps_the_high_quantile_of_residuals_and_the_slow_rate():
    # Runs of one size: typically 10 s, one in ten takes 16 s.
    runs = fit_linear([(MB, 10.0)] * 9 + [(MB, 16.0)], q=0.9)
    assert runs.seconds(MB) == 10.0 and runs.error_s == 0.0
    assert runs.upper_s == pytest.approx(0.6) and runs.high_seconds(MB) == pytest.approx(10.6)
    assert fit_linear([(MB, 10.0)] * 9 + [(MB, 16.0)], q=0.95).upper_s == pytest.approx(3.3)
    # Stage-in: the transfer tasks measured 10 MB/s typically, 5 MB/s at the slow end.
    stage_in = fit_linear([(MB, 1.1), (MB, 1.1)], per_byte_s=1 / (10 * MB), per_byte_high_s=1 / (5 * MB))
    assert stage_in.seconds(10 * MB) == pytest.approx(2.0) and stage_in.high_seconds(10 * MB) == pytest.approx(3.0)
    # Never below the typical value, whatever the residuals say.
    assert LinearModel(5.0, upper_s=-2.0).high_seconds() == 5.0


def test_a_new_pilot_is_waited_for_after_the_stage_in_a_held_slot_meanwhile():
    """The first --compare run's cold starts came in 6-9 s late: an elastic queue asks
    for a pilot only for runnable (staged-in) jobs, so stage-in and the pilot's cold
    start add up, while a held slot can free up during the stage-in."""
    history = SiteHistory(1, stage_in=LinearModel(3.0), run=LinearModel(4.0), pilot_delay_s=10.0)
    cold = estimate(SiteLoad(1, node_capacity=2), history)
    assert cold.wait_s == pytest.approx(13.0) and cold.total_s == pytest.approx(17.0)
    busy = estimate(SiteLoad(1, held_nodes=1, node_capacity=1, running_jobs=1), history)
    assert busy.wait_s == pytest.approx(4.0) and busy.total_s == pytest.approx(8.0)


def test_cold_starts_are_measured_from_the_job_that_waited_for_the_pilot():
    from datetime import datetime, timedelta

    from balsam_grpc.sdk.analytics import JobTimeline
    from balsam_grpc.sdk.routing import cold_starts
    from balsam_grpc.v1 import batch_job_pb2

    t0 = datetime(2026, 1, 1)

    def life(runnable, running):
        return JobTimeline(1, first_entry={"PREPROCESSED": t0 + timedelta(seconds=runnable),
                                           "RUNNING": t0 + timedelta(seconds=running)})

    def pilot(pid, site, created):
        b = batch_job_pb2.BatchJob(id=pid, site_id=site)
        b.create_time.FromDatetime(t0 + timedelta(seconds=created))
        return b
    lives = {1: life(0, 12), 2: life(0, 15),   # pilot 10 asked for at 1 s: job 1 (first) waited 12 s
             3: life(50, 51),                  # pilot 11 asked for at 40 s, before job 3 was runnable: no sample
             4: life(60, 61)}                  # never in a pilot: no sample
    assert cold_starts(lives, {1: 10, 2: 10, 3: 11, 4: 0}, [pilot(10, 1, 1), pilot(11, 1, 40)]) == {1: [12.0]}


def test_the_spread_counts_each_term_through_the_queue_in_quadrature():
    history = SiteHistory(1, run=LinearModel(10.0, upper_s=2.0), pilot_delay_s=10.0, pilot_delay_high_s=16.0,
                          stage_out=LinearModel(1.0, upper_s=0.5))
    # Nothing held: the job waits for a pilot, so the pilot delay's spread counts in full.
    cold = estimate(SiteLoad(1, node_capacity=1), history)
    assert cold.total_s == pytest.approx(10 + 10 + 1)
    assert dict(cold.spreads) == pytest.approx({"stage_in": 0.0, "pilot_delay": 6.0, "run": 2.0, "stage_out": 0.5})
    assert cold.spread_s == pytest.approx((36 + 4 + 0.25) ** 0.5) and cold.high_s == cold.total_s + cold.spread_s
    # A free slot: the pilot's spread does not matter.
    free = estimate(SiteLoad(1, held_nodes=1, node_capacity=1), history)
    assert dict(free.spreads)["pilot_delay"] == 0.0 and free.spread_s == pytest.approx((4 + 0.25) ** 0.5)
    # Behind two jobs on one slot, a slow run delays the jobs ahead too: three slow runs.
    queued = estimate(SiteLoad(1, held_nodes=1, node_capacity=1, running_jobs=1, backlog_jobs=1), history)
    assert queued.wait_s == pytest.approx(20.0) and dict(queued.spreads)["run"] == pytest.approx(3 * 2.0)


def test_a_borrowed_term_takes_the_widest_spread():
    a = SiteHistory(1, run=LinearModel(10.0, upper_s=1.0), pilot_delay_s=5.0, pilot_delay_high_s=6.0)
    b = SiteHistory(2, run=LinearModel(12.0, upper_s=4.0), pilot_delay_s=7.0, pilot_delay_high_s=15.0)
    prior = pooled([a, b])
    assert prior.run.fixed_s == 11.0 and prior.run.upper_s == 4.0
    assert prior.pilot_delay_s == 6.0 and prior.pilot_delay_high_s == 15.0
    new = estimate(SiteLoad(3, node_capacity=1), SiteHistory(3), prior)
    assert dict(new.spreads)["pilot_delay"] == pytest.approx(9.0)


def test_a_burst_stops_filling_the_cheap_site_before_its_slow_pilot_would_miss():
    """The defect of the first --compare run: the deadline policy filled the cheap site
    until its typical completion plus the typical run-time error reached the deadline,
    and the pilot queue delay's spread (not in that margin) made the last ones late.
    Here the cheap site's pilot takes 10 s typically, 16 s one time in ten; runs take
    5 s, 6 s at the slow end. Every job placed there must make the deadline with the
    slow pilot and slow runs."""
    loads = [SiteLoad(1, name="cheap", node_capacity=1), SiteLoad(2, name="dear", held_nodes=4, node_capacity=4)]
    histories = {1: SiteHistory(1, run=LinearModel(5.0, upper_s=1.0), pilot_delay_s=10.0, pilot_delay_high_s=16.0,
                                charge_per_node_hour=0.5),
                 2: SiteHistory(2, run=LinearModel(5.0, upper_s=1.0), pilot_delay_s=2.0, pilot_delay_high_s=3.0)}
    deadline = 25.0
    placed: Counter[int] = Counter()
    for _ in range(12):
        chosen, miss = choose_for_deadline(estimates(loads, histories, placed), deadline)
        assert not miss
        if chosen.site_id == 1:  # as late as it gets: slow pilot, every run ahead slow
            assert 16.0 + (placed[1] + 1) * 6.0 <= deadline + 1e-9
        placed[chosen.site_id] += 1
    assert placed[1] >= 1 and placed[2] >= 1  # the cheap site is used, not shunned


def test_decision_says_at_risk_from_the_high_quantile():
    from balsam_grpc.sdk.routing import Decision

    e = Estimate(1, 0, 10, 10, 0, error_s=0, cost=1, spread_s=6.0)
    assert Decision(1, "deadline", (e,), 25.0, False).at_risk is True
    assert Decision(1, "deadline", (e,), 30.0, False).at_risk is False
    assert Decision(1, "earliest", (e,), None, None).at_risk is None


def test_shortest_backlog_counts_queued_running_and_placed():
    loads = [SiteLoad(1, backlog_jobs=2, running_jobs=2), SiteLoad(2, backlog_jobs=3), SiteLoad(3, connected=False)]
    assert choose_shortest_backlog(loads) == 2
    assert choose_shortest_backlog(loads, {2: 2}) == 1
    with pytest.raises(InvalidArgument):
        choose_shortest_backlog([])


class ScriptedServer:
    """Stands in for Client.call: one page of canned List responses per method,
    honouring the filters read_history relies on (job ids, directions)."""

    def __init__(self, events, jobs, items, batch_jobs) -> None:
        self.events, self.jobs, self.items, self.batch_jobs = events, jobs, items, batch_jobs
        self.requests: list[tuple[str, object]] = []

    def call(self, service, method, request):
        from balsam_grpc.v1 import (
            batch_job_service_pb2,
            event_service_pb2,
            job_service_pb2,
            transfer_item_service_pb2,
        )

        self.requests.append((method, request))
        assert (service, method) in {("EventService", "ListEvents"), ("JobService", "ListJobs"),
                                     ("TransferService", "ListTransferItems"), ("BatchJobService", "ListBatchJobs")}
        if method == "ListEvents":
            return event_service_pb2.ListEventsResponse(events=self.events)
        if method == "ListJobs":
            return job_service_pb2.ListJobsResponse(jobs=[j for j in self.jobs if j.id in request.filter.ids])
        if method == "ListTransferItems":
            return transfer_item_service_pb2.ListTransferItemsResponse(
                transfer_items=[t for t in self.items if t.job_id in request.filter.job_ids])
        if method == "ListBatchJobs":
            return batch_job_service_pb2.ListBatchJobsResponse(batch_jobs=self.batch_jobs)
        raise AssertionError(method)


def _history_fixture():
    return ScriptedServer(*_fixture_parts())


def _fixture_parts():
    from datetime import datetime, timedelta, timezone

    from balsam_grpc.v1 import batch_job_pb2, common_pb2, event_pb2, job_pb2, transfer_item_pb2

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events, jobs, items = [], [], []

    def change(job_id, site_id, at, frm, to):
        e = event_pb2.Event(job_id=job_id, site_id=site_id,
                            job_state=event_pb2.JobStateChange(from_state=job_pb2.JobState.Value(f"JOB_STATE_{frm}"),
                                                               to_state=job_pb2.JobState.Value(f"JOB_STATE_{to}")))
        e.time.FromDatetime(t0 + timedelta(seconds=at))
        events.append(e)

    # Site 1, app 10: three finished jobs of 1, 2 and 4 MB: stage-in 1 s + 0.5 s/MB,
    # run 2 s + 3 s/MB, stage-out 0.5 s. Site 1 also ran a job of another app (ignored).
    for job_id, mb, app_id in ((1, 1, 10), (2, 2, 10), (3, 4, 10), (4, 50, 99)):
        stage_in, run = 1 + 0.5 * mb, 2 + 3 * mb
        at = 100.0 * job_id
        for frm, to, dt in (("CREATED", "READY", 0), ("READY", "STAGED_IN", stage_in),
                            ("STAGED_IN", "PREPROCESSED", 0.1), ("PREPROCESSED", "RUNNING", 5),
                            ("RUNNING", "RUN_DONE", run), ("RUN_DONE", "POSTPROCESSED", 0.1),
                            ("POSTPROCESSED", "STAGED_OUT", 0.5), ("STAGED_OUT", "JOB_FINISHED", 0)):
            at += dt
            change(job_id, 1, at, frm, to)
        jobs.append(job_pb2.Job(id=job_id, app_id=app_id, site_id=1))
        items.append(transfer_item_pb2.TransferItem(
            job_id=job_id, site_id=1, direction=common_pb2.TRANSFER_DIRECTION_IN, location_alias="aps",
            state=transfer_item_pb2.TRANSFER_STATE_DONE,
            metrics=transfer_item_pb2.TransferMetrics(bytes=int(mb * MB), duration_seconds=0.5 * mb)))
        items.append(transfer_item_pb2.TransferItem(
            job_id=job_id, site_id=1, direction=common_pb2.TRANSFER_DIRECTION_OUT, location_alias="results",
            state=transfer_item_pb2.TRANSFER_STATE_DONE,
            metrics=transfer_item_pb2.TransferMetrics(bytes=1000, duration_seconds=0.01)))
    # A job still running at site 1 counts for nothing.
    change(5, 1, 900, "CREATED", "READY")
    pilots = []
    for site_id, delays in ((1, (10, 12, 30)), (2, (40,))):
        for i, delay in enumerate(delays):
            b = batch_job_pb2.BatchJob(site_id=site_id, num_nodes=1)
            b.create_time.FromDatetime(t0 + timedelta(seconds=50 * i))
            b.start_time.FromDatetime(t0 + timedelta(seconds=50 * i + delay))
            pilots.append(b)
    pilots.append(batch_job_pb2.BatchJob(site_id=2, num_nodes=1))  # never started: no sample
    return events, jobs, items, pilots


def test_read_history_measures_phases_rates_and_pilot_delays():
    from balsam_grpc.sdk.routing import read_history

    server = _history_fixture()
    history = read_history(server, [1, 2], {1: 10, 2: 20}, in_location="aps", out_location="results",  # type: ignore[arg-type]
                           charges={2: 0.5})
    one, two = history[1], history[2]
    assert one.run.samples == 3 and one.run.per_byte_s == pytest.approx(3 / MB) and one.run.fixed_s == pytest.approx(2)
    assert one.stage_in.bytes_per_s == pytest.approx(2 * MB) and one.stage_in.fixed_s == pytest.approx(1.0)
    assert one.stage_out.fixed_s == pytest.approx(0.5, abs=0.02)
    assert one.pilot_delay_s == 12 and one.pilot_delay_samples == 3
    assert one.pilot_delay_high_s == pytest.approx(quantile([10, 12, 30], 0.9))  # 26.4: the spread is measured
    assert one.stage_in.per_byte_high_s == pytest.approx(0.5 / MB)  # every task ran at 2 MB/s
    assert two.run is None and two.pilot_delay_s == 40 and two.pilot_delay_samples == 1
    assert two.charge_per_node_hour == 0.5 and one.charge_per_node_hour == 1.0
    # The estimate a 3 MB job gets at site 2 (no history of its own) borrows site 1's.
    est = estimate(SiteLoad(2, node_capacity=1), two, pooled(history.values()), input_bytes=3 * MB)
    assert est.run_s == pytest.approx(11.0) and est.wait_s == pytest.approx(2.5 + 40) and "run" in est.borrowed


def test_read_history_stage_in_from_another_location_does_not_count():
    from balsam_grpc.sdk.routing import read_history

    history = read_history(_history_fixture(), [1], {1: 10}, in_location="elsewhere")  # type: ignore[arg-type]
    assert history[1].stage_in is None and history[1].run.samples == 3


def test_read_history_keeps_the_turnarounds_of_finished_jobs_of_the_app():
    from balsam_grpc.sdk.routing import read_history

    history = read_history(_history_fixture(), [1, 2], {1: 10, 2: 20})  # type: ignore[arg-type]
    # Creation to finished: stage-in 1 + 0.5/MB, 0.1, 5, run 2 + 3/MB, 0.1, 0.5 (job 4 is
    # another app's, job 5 has not finished).
    assert dict(history[1].turnarounds) == pytest.approx({1: 12.2, 2: 15.7, 3: 22.7})
    assert history[2].turnarounds == ()


def test_calibration_margin_from_past_excesses_and_its_fallback():
    preds = [Prediction(job_id=i, site_id=1, total_s=10.0, high_s=12.0) for i in range(30)]
    # Jobs 0..24 finished 3 .. 27 s over their predicted p90 excess -2 .. 22; the rest still run.
    done = {i: 12.0 + i - 2.0 for i in range(25)}
    excesses = prediction_excesses(preds, done)
    assert excesses == [i - 2.0 for i in range(25)]
    # Rank ceil(26 * 0.9) = 24 of 25: the 24th smallest excess.
    assert calibrated_margin(excesses, 0.9) == 21.0
    assert calibrated_margin(excesses[:19], 0.9) is None            # too little record: per-term spreads only
    assert calibrated_margin([-5.0] * 30, 0.9) == 0.0               # an over-cautious predictor is not narrowed
    assert calibrated_margin([1.0, 2.0], 0.9, min_samples=2) == 2.0  # rank past n: the largest
    base = SiteHistory(1, run=LinearModel(10.0, upper_s=2.0))
    plain = estimate(SiteLoad(1, held_nodes=1), base)
    wider = estimate(SiteLoad(1, held_nodes=1), base, calibration_s=21.0)
    assert wider.total_s == plain.total_s and wider.spread_s == plain.spread_s
    assert wider.high_s == pytest.approx(plain.high_s + 21.0) and wider.spread_high_s == plain.high_s
    assert wider.as_dict()["calibration_s"] == 21.0
    assert estimates([SiteLoad(1, held_nodes=1)], {1: base}, calibration_s=None)[0].high_s == plain.high_s


def test_calibrated_p90_covers_a_biased_predictor():
    # The queue model runs 30 % slow plus noise the per-term spreads do not see: its own
    # p90 covers far fewer than 90 % of turnarounds; calibrated on 200 earlier jobs, the
    # next 2000 land within the widened p90 about 90 % of the time.
    import random

    rng = random.Random(7)

    def job(i):
        total = rng.uniform(20.0, 120.0)
        actual = 1.3 * total + rng.gauss(0.0, 8.0) + rng.expovariate(1 / 5.0)
        return Prediction(job_id=i, site_id=1, total_s=total, high_s=total + 6.0), actual

    past = [job(i) for i in range(200)]
    margin = calibrated_margin(prediction_excesses([p for p, _ in past], {p.job_id: a for p, a in past}), 0.9)
    future = [job(1000 + i) for i in range(2000)]
    raw = sum(a <= p.high_s for p, a in future) / len(future)
    covered = sum(a <= p.high_s + margin for p, a in future) / len(future)
    print(f"p90 coverage: per-term spreads {raw:.1%}, calibrated {covered:.1%} (margin {margin:.1f} s)")
    assert raw < 0.6 and 0.86 <= covered <= 0.94


def test_the_router_calibrates_on_the_jobs_it_recorded():
    from balsam_grpc.sdk.routing import Router
    from balsam_grpc.v1 import site_service_pb2

    class WithStatistics(ScriptedServer):
        def call(self, service, method, request):
            if method == "ListSiteStatistics":
                return site_service_pb2.ListSiteStatisticsResponse(
                    sites=[site_service_pb2.SiteStatistics(site_id=1, connected=True, held_nodes=4)])
            return super().call(service, method, request)

    router = Router(WithStatistics(*_fixture_parts()), [1], "earliest", min_calibration=3)  # type: ignore[arg-type]
    first = router.decide(input_bytes=MB)
    assert first.chosen.calibration_s == 0.0 and router.calibration() == (None, 0)
    router.record(first, 1)
    router.record(first, 5)         # has not finished: no error yet
    router.record(first, 2)
    assert router.calibration() == (None, 2)   # fewer than min_calibration
    router.record(first, 3)
    margin, used = router.calibration()
    # Turnarounds 12.2, 15.7, 22.7 s against one predicted p90: rank ceil(4 * 0.9) = 4 > 3, the largest.
    assert used == 3 and margin == pytest.approx(22.7 - first.chosen.spread_high_s) and margin > 0
    later = router.decide(input_bytes=MB).chosen
    assert later.calibration_s == pytest.approx(margin) and later.high_s == pytest.approx(later.spread_high_s + margin)


def test_a_fresh_router_calibrates_on_the_predictions_the_jobs_carry():
    # What `balsamctl route` sees: a new router with no record of its own. The routed
    # jobs were submitted with data=decision.job_data(); once finished, their predictions
    # come back with the history and set the same margin as the router that recorded them.
    from google.protobuf import struct_pb2

    from balsam_grpc.sdk.routing import ROUTING_KEY, Decision, Router, read_history, recorded_prediction
    from balsam_grpc.v1 import site_service_pb2

    class WithStatistics(ScriptedServer):
        def call(self, service, method, request):
            if method == "ListSiteStatistics":
                return site_service_pb2.ListSiteStatisticsResponse(
                    sites=[site_service_pb2.SiteStatistics(site_id=1, connected=True, held_nodes=4)])
            return super().call(service, method, request)

    events, jobs, items, pilots = _fixture_parts()
    server = WithStatistics(events, jobs, items, pilots)
    recording = Router(server, [1], "earliest", min_calibration=3)  # type: ignore[arg-type]
    decision = recording.decide(input_bytes=MB)
    data = decision.job_data()
    assert data[ROUTING_KEY]["high_s"] == pytest.approx(decision.chosen.spread_high_s, abs=1e-3)
    assert Decision(1, "round_robin").job_data() == {} and recorded_prediction(1, {"other": 1}) is None
    for job in jobs[:3]:    # jobs 1..3 (finished) were routed; job 4 was not: nothing to count
        job.data.CopyFrom(struct_pb2.Struct())
        job.data.update(data)
    history = read_history(server, [1], {1: 10})  # type: ignore[arg-type]
    assert [p.job_id for p in history[1].predictions] == [1, 2, 3]
    fresh = Router(server, [1], "earliest", min_calibration=3)  # type: ignore[arg-type]
    margin, used = fresh.calibration()
    assert used == 3 and margin == pytest.approx(22.7 - decision.chosen.spread_high_s, abs=1e-3) and margin > 0
    assert fresh.estimates(input_bytes=MB)[0].calibration_s == pytest.approx(margin)
    for job_id in (1, 2, 3):   # recorded in memory as well: counted once
        fresh.record(decision, job_id)
    assert fresh.calibration()[1] == 3


def test_the_queue_advances_no_faster_than_the_measured_interval_between_starts():
    # Site 1 holds 4 slots, but one pilot leased the burst ahead and served it alone on its
    # 2 slots while the other idled: starts came 2 s apart, not 4 s / 4 slots. Jobs that
    # were their pilot's first (a cold start) or were not yet runnable do not count.
    from datetime import datetime, timedelta, timezone

    from balsam_grpc.sdk.analytics import JobTimeline
    from balsam_grpc.sdk.routing import slot_waits, start_intervals

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def life(runnable, start):
        return JobTimeline(site_id=1, first_entry={"PREPROCESSED": t0 + timedelta(seconds=runnable),
                                                    "RUNNING": t0 + timedelta(seconds=start)})

    lives = {1: life(0, 5), 2: life(0, 5), 3: life(0, 9), 4: life(0, 9), 5: life(0, 13), 6: life(12, 17),
             7: life(30, 40)}
    pilots = {1: 100, 2: 100, 3: 100, 4: 100, 5: 100, 6: 100, 7: 101}   # job 7: first of a new pilot
    # Job 2 starts with job 1 (0 s), 3 and 4 after 4 s and 0 s, 5 and 6 (runnable at 12 s,
    # before 5 started) 4 s each; 1 and 7 were their pilots' first jobs.
    assert start_intervals(lives, pilots) == {1: [0.0, 4.0, 0.0, 4.0, 4.0]}
    load = SiteLoad(1, backlog_jobs=8, running_jobs=0, held_nodes=4, node_capacity=4)
    by_slots, _ = slot_waits(load, 0, 4.0, 2.0)
    by_interval, _ = slot_waits(load, 0, 4.0, 2.0, start_interval_s=2.4)
    assert by_slots == pytest.approx(5 * 4.0 / 4) and by_interval == pytest.approx(5 * 2.4)
    assert slot_waits(load, 0, 4.0, 2.0, start_interval_s=0.5)[0] == by_slots   # never faster than the slots
    history = SiteHistory(1, run=LinearModel(4.0), start_interval_s=2.4)
    slower = estimate(load, history)
    plain = estimate(load, replace(history, start_interval_s=None))
    assert slower.wait_s == pytest.approx(by_interval) and slower.wait_s > plain.wait_s


def test_a_prediction_without_any_run_history_is_not_recorded():
    from balsam_grpc.sdk.routing import Decision

    blind = estimate(SiteLoad(1, held_nodes=1), SiteHistory(1))
    assert not blind.informed and Decision(1, "deadline", (blind,), 25.0).job_data() == {}
    seen = estimate(SiteLoad(1, held_nodes=1), SiteHistory(1, run=LinearModel(3.0)))
    assert seen.informed and Decision(1, "deadline", (seen,), 25.0).job_data()["routing"]["total_s"] == 3.0
