"""The edge probes of issue 12 as one table at the end of the run: probe, expected,
observed. A test joins it with `@pytest.mark.edge("probe", "expected")`; what it saw
goes in with pytest's `record_property("observed", "...")`, and a test that records
nothing reads "as expected" when it passed. A failure or skip shows its reason instead,
so the table is read together with the test outcomes, never instead of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class Row:
    probe: str
    expected: str
    observed: str


ROWS: list[Row] = []


def _probe_name(item: pytest.Item, probe: str) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return probe
    # Ids of lambdas and objects ("<lambda>") say nothing: keep the readable parts.
    parts = [part for part in callspec.id.split("-") if not part.startswith("<")]
    return f"{probe} [{'-'.join(parts)}]"


def _first_line(report: pytest.TestReport) -> str:
    text = str(report.longrepr).strip().splitlines()
    lines = [line.strip() for line in text if line.strip().startswith("E ")] or text[-1:]
    return lines[0].removeprefix("E").strip()[:100] if lines else "?"


def _observed(item: pytest.Item, report: pytest.TestReport) -> str:
    if report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return f"SKIPPED: {str(reason).removeprefix('Skipped: ')}"
    if report.failed:
        return f"FAILED ({report.when}): {_first_line(report)}"
    seen = [str(value) for key, value in item.user_properties if key == "observed"]
    return "; ".join(seen) if seen else "as expected"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    marker = item.get_closest_marker("edge")
    if marker is None:
        return
    # One row per test: its call, or the setup that failed or skipped before any call.
    # It travels in the report, so that under pytest-xdist the controlling process, which
    # prints the table, receives the rows its workers made.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        probe, expected = marker.args
        report.user_properties.append((_ROW, (_probe_name(item, probe), expected, _observed(item, report))))


_ROW = "edge_probe_row"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    ROWS.extend(Row(*value) for key, value in report.user_properties if key == _ROW)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "edge(probe, expected): a row of the edge-probe table printed at the end of the run")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("edge probes (issue 12): probe, expected, observed")
    width = max(len(r.probe) for r in ROWS)
    exp_width = max(len(r.expected) for r in ROWS)
    head = f"{'probe':<{width}}  {'expected':<{exp_width}}  observed"
    tr.write_line(head)
    tr.write_line("-" * len(head))
    for r in sorted(ROWS, key=lambda r: r.probe):
        tr.write_line(f"{r.probe:<{width}}  {r.expected:<{exp_width}}  {r.observed}")
    bad = sum(r.observed.startswith(("FAILED", "SKIPPED")) for r in ROWS)
    tr.write_line(f"{len(ROWS)} probes; {len(ROWS) - bad} as expected, {bad} failed or skipped")
