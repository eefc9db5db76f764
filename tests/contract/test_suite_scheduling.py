"""How the suite is shared between pytest-xdist workers (tests/conftest.py): the files of
a SHARED_WORKER group are one work unit, from node ids as the installed pytest makes them.

The defect: the install tests and the real-Slurm tests were grouped with xdist's
`xdist_group` mark, which pytest 9.2 silently disabled. CI handed the two install files to
two workers, whose simultaneous wheel builds in the one source tree failed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import SHARED_WORKER, STARTS_FIRST, pytest_xdist_make_scheduler

REPO = Path(__file__).resolve().parents[2]
OTHERS = ("tests/unit/test_backoff.py", "tests/e2e/test_xpcs_demo.py", "tests/server/test_notify.py")


class Worker:
    """What the scheduler calls on a pytest-xdist worker."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.sent += indexes

    def shutdown(self) -> None:
        raise AssertionError("two workers, more work units than that: none is shut down")


def files_of(prefixes: tuple[str, ...]) -> list[str]:
    found: list[Path] = []
    for prefix in prefixes:
        path = REPO / prefix
        found += sorted(path.rglob("test_*.py")) if prefix.endswith("/") else [path]
    return [str(p.relative_to(REPO)) for p in found]


def test_the_files_of_a_group_are_one_work_unit_and_start_first() -> None:
    groups = {group: files_of(prefixes) for group, prefixes in SHARED_WORKER.items()}
    for group, files in groups.items():
        assert len(files) >= 2 and all((REPO / f).is_file() for f in files), (group, files)
    # Node ids as pytest makes them: file, "::", test name (nothing appended).
    collection = [f"{f}::test_{i}" for f in [*sum(groups.values(), []), *OTHERS] for i in range(3)]
    config = SimpleNamespace(getvalue={"tx": ["2*popen"]}.get, option=SimpleNamespace(loadscopereorder=True))
    scheduler = pytest_xdist_make_scheduler(config, None)
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()

    units = {scope: set(ids) for scope, ids in scheduler.workqueue.items()}
    for worker in workers:
        units |= {scope: set(ids) for scope, ids in scheduler.assigned_work[worker].items()}
    expected = {group: {i for i in collection if i.split("::")[0] in files} for group, files in groups.items()}
    expected |= {f: {i for i in collection if i.startswith(f + "::")} for f in OTHERS}
    assert units == expected
    # The long units are handed out first, in STARTS_FIRST's order.
    first = [{collection[i].split("::")[0] for i in w.sent} for w in workers]
    assert first == [set(groups[STARTS_FIRST[0]]), {STARTS_FIRST[1]}]
