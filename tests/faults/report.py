"""The fault suite's results: one row per scenario, printed as a table at the end of the
run (tests/faults/conftest.py). A module of its own so the tests and the conftest share
one list whatever name pytest imports the conftest under."""

from __future__ import annotations

from dataclasses import dataclass

from tests.faults.harness import Audit


@dataclass
class Row:
    fault: str
    recovery_s: float | None
    recovered_when: str
    jobs: int
    lost: int
    duplicates: int


ROWS: list[Row] = []


def record(fault: str, recovery_s: float | None, recovered_when: str, result: Audit) -> None:
    """Add a scenario's line to the table (before asserting, so a failure shows too)."""
    ROWS.append(Row(fault, recovery_s, recovered_when, result.jobs, len(result.lost), len(set(result.duplicates))))
