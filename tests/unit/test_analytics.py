"""Analytics over job state changes: phases, percentiles, throughput, running footprint."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from google.protobuf import struct_pb2

from balsam_grpc.sdk.analytics import (
    Percentiles,
    StateChange,
    latency_breakdown,
    running_over_time,
    state_change,
    throughput,
)
from balsam_grpc.v1 import event_pb2, job_pb2

T0 = datetime(2026, 11, 21, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def life(job_id: int, site_id: int, start: float, wait: float, run: float) -> list[StateChange]:
    """A job with stage-in and postprocess steps taken by the server (via)."""
    return [
        StateChange(job_id, site_id, at(start), "CREATED", "READY"),
        StateChange(job_id, site_id, at(start + 2), "READY", "PREPROCESSED", via=("STAGED_IN",)),
        StateChange(job_id, site_id, at(start + 2 + wait), "PREPROCESSED", "RUNNING"),
        StateChange(job_id, site_id, at(start + 2 + wait + run), "RUNNING", "JOB_FINISHED",
                    via=("RUN_DONE", "POSTPROCESSED", "STAGED_OUT")),
    ]


def test_latency_breakdown_per_phase_and_site() -> None:
    changes = life(1, 10, 0, wait=1, run=5) + life(2, 10, 0, wait=3, run=7) + life(3, 20, 1, wait=0.5, run=1)
    changes.append(StateChange(4, 20, at(0), "CREATED", "READY"))  # unfinished: not counted
    stats = latency_breakdown(changes)
    assert stats[10]["wait"].count == 2 and stats[10]["wait"].p50 == pytest.approx(2.0)
    assert stats[10]["run"].max == pytest.approx(7.0)
    assert stats[10]["stage_in"].p50 == pytest.approx(2.0)
    assert stats[10]["total"].p50 == pytest.approx(10.0)  # (8 + 12) / 2
    assert stats[20]["total"].count == 1 and stats[20]["total"].p50 == pytest.approx(3.5)
    assert stats[None]["run"].count == 3


def test_retried_job_counts_its_last_run() -> None:
    changes = [
        StateChange(1, 1, at(0), "CREATED", "PREPROCESSED", via=("READY", "STAGED_IN")),
        StateChange(1, 1, at(1), "PREPROCESSED", "RUNNING"),
        StateChange(1, 1, at(2), "RUNNING", "RESTART_READY", via=("RUN_ERROR",)),
        StateChange(1, 1, at(5), "RESTART_READY", "RUNNING"),
        StateChange(1, 1, at(9), "RUNNING", "JOB_FINISHED", via=("RUN_DONE", "POSTPROCESSED", "STAGED_OUT")),
    ]
    stats = latency_breakdown(changes)[1]
    assert stats["run"].p50 == pytest.approx(4.0) and stats["wait"].p50 == pytest.approx(1.0)
    assert stats["total"].p50 == pytest.approx(9.0)


def test_throughput_bins_and_cumulative() -> None:
    changes = [c for j in range(5) for c in life(j, 1 + j % 2, j * 30, wait=0, run=1)]
    series = throughput(changes, bin_seconds=60)
    assert [(n, total) for _, n, total in series[None]] == [(2, 2), (2, 4), (1, 5)]
    assert sum(n for _, n, _ in series[1]) == 3 and sum(n for _, n, _ in series[2]) == 2


def test_running_footprint_steps() -> None:
    changes = life(1, 1, 0, wait=0, run=10) + life(2, 1, 0, wait=4, run=2)
    series = running_over_time(changes, footprint={1: 0.5, 2: 2.0})[None]
    assert [level for _, level in series] == [0.5, 2.5, 0.5, 0.0]


def test_percentiles_interpolate_and_handle_empty() -> None:
    p = Percentiles.of([float(x) for x in range(1, 101)])
    assert p.p50 == pytest.approx(50.5) and p.p99 == pytest.approx(99.01) and p.max == 100
    assert Percentiles.of([]).count == 0


def test_state_change_from_event_message() -> None:
    data = struct_pb2.Struct()
    data.update({"via": ["RUN_DONE", "POSTPROCESSED"]})
    ev = event_pb2.Event(id=1, job_id=7, site_id=3, data=data)
    ev.time.FromDatetime(T0)
    ev.job_state.from_state = job_pb2.JOB_STATE_RUNNING
    ev.job_state.to_state = job_pb2.JOB_STATE_JOB_FINISHED
    change = state_change(ev)
    assert change is not None and change.entered == ("RUN_DONE", "POSTPROCESSED", "JOB_FINISHED")
    assert change.time == T0 and change.from_state == "RUNNING"
    assert state_change(event_pb2.Event(id=2)) is None


def test_a_held_ahead_jobs_release_is_no_state_change() -> None:
    """Releasing a job a launcher held ahead writes an event from and to its state
    (data.released): the job entered no state, so analytics do not count it; counted, it
    moved the job's last PREPROCESSED entry and stretched a run's span to the release."""
    data = struct_pb2.Struct()
    data.update({"session_id": "s1", "released": True})
    released = event_pb2.Event(id=3, job_id=7, site_id=3, data=data)
    released.time.FromDatetime(at(100))
    released.job_state.from_state = released.job_state.to_state = job_pb2.JOB_STATE_PREPROCESSED
    assert state_change(released) is None
