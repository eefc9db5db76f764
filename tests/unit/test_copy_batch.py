"""store.codec.CopyBatch: a batch's COPY text with the columns every row shares written
once into a tail, and nothing collapsed that would change a stored value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from balsam_grpc.server.store.codec import CopyBatch, copy_text
from balsam_grpc.server.store.tables import events

COLUMNS = [c.name for c in events.columns if c.name != "id"]
NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def event(job_id: int, **changes: object) -> dict[str, object]:
    row: dict[str, object] = {"owner_id": 1, "site_id": 2, "job_id": job_id, "kind": "job_state", "subject_id": None,
                              "from_state": "CREATED", "to_state": "PREPROCESSED", "time": NOW, "receive_time": NOW,
                              "data": {"via": ["READY"]}, "message": ""}
    row.update(changes)
    return row


def parsed(batch: CopyBatch, text: str) -> list[dict[str, str]]:
    return [dict(zip(batch.names, line.split("\t"), strict=True)) for line in text.splitlines()]


def test_columns_every_row_shares_are_written_once_after_the_varying_ones() -> None:
    shared = {"via": ["READY"]}
    rows = [event(10 + i, data=shared) for i in range(5)]
    batch = CopyBatch(events, COLUMNS, rows, with_ids=True)
    assert batch.names[:2] == ["id", "job_id"] and sorted(batch.names[2:]) == sorted(set(COLUMNS) - {"job_id"})
    got = parsed(batch, batch.text(1, 4, [101, 102, 103]))
    assert [r["id"] for r in got] == ["101", "102", "103"] and [r["job_id"] for r in got] == ["11", "12", "13"]
    plain = [dict(zip(["id", *COLUMNS], line.split("\t"), strict=True))
             for line in copy_text(events, COLUMNS, rows[1:4], [101, 102, 103]).splitlines()]
    assert got == plain


def test_equal_json_that_is_not_the_same_json_is_not_shared() -> None:
    # {"a": 1} == {"a": True} in Python, but they are different JSON values.
    rows = [event(1, data={"a": 1}), event(2, data={"a": True}), event(3, data={"a": 1})]
    batch = CopyBatch(events, COLUMNS, rows)
    assert "data" in batch.names[:2]
    assert [r["data"] for r in parsed(batch, batch.text(0, 3))] == ['{"a": 1}', '{"a": true}', '{"a": 1}']


def test_empty_containers_and_nulls_are_shared_and_none_is_null() -> None:
    rows = [event(i, data={}) for i in range(3)]  # a new empty dict per row
    batch = CopyBatch(events, COLUMNS, rows)
    assert batch.names[0] == "job_id" and batch.tail is not None
    assert {r["data"] for r in parsed(batch, batch.text(0, 3))} == {"{}"}
    nulls = CopyBatch(events, COLUMNS, [event(i, data=None) for i in range(3)])
    assert {r["data"] for r in parsed(nulls, nulls.text(0, 3))} == {"\\N"}


def test_one_instant_in_two_time_zones_is_one_value_and_a_different_one_varies() -> None:
    elsewhere = NOW.astimezone(timezone(timedelta(hours=2)))
    same = CopyBatch(events, COLUMNS, [event(1), event(2, time=elsewhere)])
    assert "time" not in same.names[:1]
    later = CopyBatch(events, COLUMNS, [event(1), event(2, time=NOW + timedelta(microseconds=1))])
    times = [r["time"] for r in parsed(later, later.text(0, 2))]
    assert times == [NOW.isoformat(), (NOW + timedelta(microseconds=1)).isoformat()]


def test_every_column_varying_leaves_no_tail() -> None:
    rows = [{c: None for c in COLUMNS} | {"owner_id": i, "site_id": i, "job_id": i, "kind": str(i), "subject_id": i,
                                          "from_state": str(i), "to_state": str(i), "time": NOW + timedelta(seconds=i),
                                          "receive_time": NOW + timedelta(seconds=i), "data": [i], "message": str(i)}
            for i in range(2)]
    batch = CopyBatch(events, COLUMNS, rows)
    assert batch.tail is None and batch.names == COLUMNS
    assert batch.text(0, 2) == copy_text(events, COLUMNS, rows)


def test_a_slice_past_the_end_stops_at_the_last_row() -> None:
    rows = [event(i) for i in range(3)]
    batch = CopyBatch(events, COLUMNS, rows, with_ids=True)
    assert batch.text(2, 2000, [7]).count("\n") == 1


def test_distinct_dicts_equal_by_value_keep_their_own_json() -> None:
    """Repeating dict contents are encoded once (codec._format_flat_dicts) but only when
    every key and value is a str: {"a": 1}, {"a": 1.0} and {"a": True} are equal in
    Python and are three different JSON texts."""
    values: list[object] = [1, True, 1.0, "1"]
    rows = [event(i, data={"a": values[i % 4], "k": "v"}) for i in range(200)]
    rows += [event(200 + i, data={"tag": str(i % 3)}) for i in range(100)]
    batch = CopyBatch(events, COLUMNS, rows)
    got = [line["data"] for line in parsed(batch, batch.text(0, len(rows)))]
    texts = ['{"a": 1, "k": "v"}', '{"a": true, "k": "v"}', '{"a": 1.0, "k": "v"}', '{"a": "1", "k": "v"}']
    assert got[:200] == [texts[i % 4] for i in range(200)]
    assert got[200:] == [f'{{"tag": "{i % 3}"}}' for i in range(100)]


def test_a_column_of_distinct_dicts_encodes_each_as_on_its_own() -> None:
    """Distinct dicts (a job's parameters) are encoded in one call and cut apart
    (codec._format_flat_dict_column): each text is the value's own, braces, separators
    and backslashes inside strings included, and a nested dict or a None keeps the
    per-value path."""
    from balsam_grpc.server.store.codec import _json

    tricky: list[object] = [{"a": "}, {"}, {"b": "x\\\\y\\t"}, {}, {"c": [1, 2.5, None, True]}, {"d": {"e": 1}}, None]
    for extra in ([], tricky[:4], tricky):
        data: list[object] = [{"i": str(i)} for i in range(100)] + extra
        rows = [event(i, data=d) for i, d in enumerate(data)]
        batch = CopyBatch(events, COLUMNS, rows)
        got = [line["data"] for line in parsed(batch, batch.text(0, len(rows)))]
        assert got == ["\\N" if d is None else _json(d) for d in data]
