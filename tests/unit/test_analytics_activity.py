"""sdk.analytics: nodes held over time, step integrals, per-site activity and utilisation
(pure, hand-computed expectations)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from balsam_grpc.sdk.analytics import (
    Allocation,
    StateChange,
    activity,
    held_over_time,
    step_integral,
)

T0 = datetime(2024, 5, 1, 8, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_held_over_time_and_integral():
    allocs = [Allocation(1, at(0), at(10), 2), Allocation(1, at(5), None, 1), Allocation(2, at(2), at(4), 4)]
    held = held_over_time(allocs, until=at(20))
    assert held[1] == [(at(0), 2), (at(5), 3), (at(10), 1), (at(20), 0)]
    assert step_integral(held[1], at(0), at(20)) == pytest.approx(2 * 5 + 3 * 5 + 1 * 10)
    assert step_integral(held[None], at(0), at(20)) == pytest.approx(35 + 4 * 2)
    # A window inside the series; before the first point the level is 0.
    assert step_integral(held[1], at(7), at(12)) == pytest.approx(3 * 3 + 1 * 2)
    assert step_integral(held[2], at(0), at(3)) == pytest.approx(4 * 1)


def test_activity_per_site_and_overall():
    changes = [
        StateChange(1, 1, at(0), "UNSPECIFIED", "PREPROCESSED"),
        StateChange(1, 1, at(2), "PREPROCESSED", "RUNNING"),
        StateChange(1, 1, at(6), "RUNNING", "JOB_FINISHED", via=("RUN_DONE",)),
        StateChange(2, 2, at(0), "UNSPECIFIED", "PREPROCESSED"),
        StateChange(2, 2, at(4), "PREPROCESSED", "RUNNING"),
        StateChange(2, 2, at(12), "RUNNING", "JOB_FINISHED", via=("RUN_DONE",)),
    ]
    allocs = [Allocation(1, at(0), None, 2), Allocation(2, at(3), at(12), 1)]
    acts = activity(changes, allocs, bin_seconds=6)
    a1, a2, both = acts[1], acts[2], acts[None]
    assert (a1.finished, a2.finished, both.finished) == (1, 1, 2)
    assert both.span_seconds == 12 and both.throughput_per_minute == pytest.approx(10.0)
    assert a1.mean_running == pytest.approx(4 / 12) and a1.mean_held_nodes == pytest.approx(2.0)
    assert a1.utilisation == pytest.approx(4 / 24)
    assert a2.utilisation == pytest.approx(8 / 9)
    assert both.utilisation == pytest.approx(12 / 33)
    assert both.peak_per_minute == pytest.approx(10.0)  # one finish per 6 s bin
    assert math.isnan(activity(changes, [], bin_seconds=6)[1].utilisation)  # no pilots known
    assert activity([], allocs) == {}
