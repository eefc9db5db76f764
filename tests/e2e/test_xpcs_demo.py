"""The XPCS scenario end to end, reduced: `scripts/xpcs_demo.py` (what `scripts/demo`
runs) with real processes: the server, three site daemons on the local scheduler whose
elastic queues start and stop pilots (launchers) with the backlog, the experiment agent
routing bursts of real datasets that the sites' transfer services stage in from the
instrument's folder and whose results they stage out to the results folder, and
`balsamctl analytics` with plots. Checks the science (each staged-out fitted D against
the generator's truth), the data movement (the server's transfer items against the
files on disk), the routing (more work to the bigger, faster sites), the elastic caps,
the analytics (consistent with the event log and the agent's record) and a clean stop
(no process of the run left)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15  # relative error of the fitted D; the kernel's is a few percent
DATASETS = 12  # two bursts of 6, more than alpha and beta hold at once (4 + 2 nodes)
CAPS = {"alpha": 4, "beta": 2, "gamma": 1}  # elastic_queue.max_total_nodes of the demo's sites

POSTGRES_URL = os.environ.get("BALSAM_TEST_DATABASE_URL", "")

# A guard against a demo that hangs, not a speed check: it takes about a minute on an
# idle machine, but its last steps (the analytics and the plots, a matplotlib process
# each) took 180 s under load 10-13, with the other worker building mpi4py beside it.
DEMO_TIMEOUT_S = 480
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 90)  # room to stop a demo that overran


class Db:
    """The server's database after the run (the server is stopped: its record as left)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def execute(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)).mappings())


def _params() -> list[Any]:
    skip = pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set (CI sets it)")
    return [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=skip)]


@pytest.fixture(scope="module", params=_params())
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite file, or a PostgreSQL database of the run's own (created and dropped here)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('xpcs-db') / 'balsam.db'}"
        return
    from tests.support.databases import drop_postgres, fresh_postgres

    url = fresh_postgres(POSTGRES_URL, f"xpcs_e2e_{uuid.uuid4().hex[:8]}")
    try:
        yield url
    finally:
        drop_postgres(url)


@pytest.fixture(scope="module")
def run(tmp_path_factory, database_url):
    tmp = tmp_path_factory.mktemp("xpcs-demo")
    home = tmp / "home"
    summary, analytics = tmp / "summary.json", tmp / "analytics.json"
    # The user's home, empty: the demo must leave nothing there (matplotlib's config and
    # cache go there unless told otherwise, in XDG_* when those are set).
    user_home = tmp / "user-home"
    user_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "xpcs_demo.py"), "--home", str(home), "--datasets", str(DATASETS),
         "--burst", "6", "--interval", "4", "--idle-timeout", "5", "--summary", str(summary),
         "--analytics-json", str(analytics), "--database", database_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**env, "HOME": str(user_home)})
    try:
        stdout, stderr = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, as Ctrl-C: the demo stops its server, dashboard, daemons and pilots (each
        # in a session of its own, so a SIGKILL of the demo alone would leave them running).
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the demo took over {DEMO_TIMEOUT_S} s and was stopped:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
    (stats,) = json.loads(analytics.read_text())
    db = Db(database_url)
    yield {"stdout": stdout, "summary": json.loads(summary.read_text()), "analytics": stats, "home": home,
           "db": db, "user_home": user_home}
    db.engine.dispose()


def test_every_dataset_reduced_and_fits_the_truth(run):
    summary, home = run["summary"], run["home"]
    assert summary["datasets"] == DATASETS and summary["finished"] == DATASETS
    for rec in summary["records"]:
        assert rec["state"] == "JOB_FINISHED", rec
        assert abs(rec["fitted"] / rec["truth"] - 1) < TOLERANCE, rec
        # The results file the site staged out, at the results location (not in a workdir).
        out = Path(rec["output"])
        assert out.parent == home / "results" / summary["run_id"]
        results = json.loads(out.read_text())
        assert len(results["rings"]) == 8 and results["truth"]["diffusion_m2_per_s"] == pytest.approx(rec["truth"])
        assert results["diffusion_m2_per_s"] == pytest.approx(rec["fitted"])


def test_files_were_staged_in_and_out(run):
    """Every job has a done stage-in item whose bytes are the dataset's size at the
    instrument, and a done stage-out item whose bytes are the results file's size; the
    app read and wrote only inside its workdir (the staged-in copy is cleaned up)."""
    db, home, run_id = run["db"], run["home"], run["summary"]["run_id"]
    items = db.execute("SELECT t.direction, t.slot, t.location_alias, t.remote_path, t.state, t.bytes, t.files, "
                       "j.workdir, s.name AS site FROM transfer_items t JOIN jobs j ON j.id = t.job_id "
                       "JOIN sites s ON s.id = t.site_id")
    assert len(items) == 3 * DATASETS   # the raw HDF5 dataset in; the JSON summary and the HDF5 results out
    local = {"result": "result.json", "viewer": "result_results.hdf"}
    for item in items:
        assert item["state"] == "DONE" and item["files"] == 1, dict(item)
        if item["direction"] == "IN":
            assert (item["slot"], item["location_alias"]) == ("dataset", "aps")
            source = home / "instrument" / item["remote_path"].lstrip("/")
            assert source.parent.name == run_id and item["bytes"] == source.stat().st_size > 0
            assert source.suffix == ".h5" and source.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
        else:
            assert item["slot"] in local and item["location_alias"] == "results", dict(item)
            target = home / "results" / item["remote_path"].lstrip("/")
            assert item["bytes"] == target.stat().st_size > 0
            workdir = home / "sites" / item["site"] / "data" / item["workdir"]
            assert (workdir / local[item["slot"]]).read_bytes() == target.read_bytes()


def test_router_sends_more_work_to_the_faster_sites(run):
    placements = run["summary"]["placements"]
    assert set(placements) <= set(CAPS) and sum(placements.values()) == DATASETS
    assert len(placements) >= 2, placements
    # alpha: up to 4 nodes behind a 2 s queue delay; gamma: 1 node behind 10 s.
    assert placements.get("alpha", 0) > placements.get("gamma", 0), placements


def test_elastic_queues_stayed_under_their_caps_and_scaled_to_zero(run):
    db = run["db"]
    names = {row["id"]: row["name"] for row in db.execute("SELECT id, name FROM sites")}
    spans: dict[str, list[tuple[datetime, datetime, int]]] = defaultdict(list)
    for bj in db.execute("SELECT site_id, state, num_nodes, create_time, end_time FROM batch_jobs"):
        # Every pilot ended by itself (idle launchers exit; nothing was left to cancel).
        assert bj["state"] == "FINISHED" and bj["end_time"], dict(bj)
        spans[names[bj["site_id"]]].append((_t(bj["create_time"]), _t(bj["end_time"]), bj["num_nodes"]))
    assert set(spans) == set(run["summary"]["placements"])  # pilots only where there was work
    for site, pilots in spans.items():
        # Nodes held by queued + running pilots, at each pilot's request: never above the cap.
        for start, _, _ in pilots:
            held = sum(n for s, e, n in pilots if s <= start < e)
            assert held <= CAPS[site], (site, pilots)
    assert "every site scaled to zero" in run["stdout"]


def test_analytics_agree_with_the_run(run):
    stats, summary, db = run["analytics"], run["summary"], run["db"]
    assert stats["jobs"] == DATASETS
    for state in ("STAGED_IN", "RUNNING", "STAGED_OUT", "JOB_FINISHED"):
        assert stats["states"][state] == DATASETS, stats["states"]
    sites = stats["sites"]
    assert sites["all"]["finished"] == DATASETS
    # Per site, the analytics count what the event log holds and the agent placed.
    finished = {row["name"]: row["n"] for row in db.execute(
        "SELECT s.name, COUNT(DISTINCT e.job_id) AS n FROM events e JOIN sites s ON s.id = e.site_id "
        "WHERE e.kind = 'job_state' AND e.to_state = 'JOB_FINISHED' GROUP BY s.name")}
    assert finished == summary["placements"]
    for name, count in summary["placements"].items():
        assert sites[name]["finished"] == count
        assert sites[name]["utilisation"] is not None and 0 < sites[name]["utilisation"] <= 1.0
        assert sites[name]["latency_seconds"]["total"]["count"] == count
    latency = stats["latency_seconds"]
    for phase in ("stage_in", "wait", "run", "stage_out", "total"):
        assert latency[phase]["count"] == DATASETS, phase
    # Real copies take time: both transfer phases are measured, not skipped.
    assert latency["stage_in"]["p50"] > 0 and latency["stage_out"]["p50"] > 0
    total = latency["total"]
    assert 0 < total["p50"] <= total["p99"]
    assert total["p50"] >= latency["run"]["p50"]  # each total contains its run
    assert sum(b["finished"] for b in stats["throughput"]) == DATASETS
    for plot in ("throughput.png", "utilisation.png", "latency.png"):
        path = run["home"] / "plots" / plot
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = run["stdout"]
    assert "per site over the run" in out and "latency per site" in out and "== stopped" in out
    assert f"done {DATASETS:>3}/{DATASETS:<3}" in out  # the live progress reached the end


def test_the_science_pictures_and_the_d_table(run):
    """`balsamctl results --tag exp=RUN` read the staged-out results: a row per dataset
    (fitted D, truth, error) and the pictures: g2 with fits, D against the truth."""
    out, plots = run["stdout"], run["home"] / "plots"
    assert f"{DATASETS} XPCS results" in out and "|D error| median" in out
    pictures = sorted(p.name for p in plots.glob("*.png") if p.name.startswith(("g2-", "diffusion", "twotime-")))
    # g2 and the two-time map (from the staged-out HDF5 results) of two datasets, D across all.
    assert pictures == ["diffusion.png", "g2-ds-0000.png", "g2-ds-0001.png", "twotime-ds-0000.png",
                        "twotime-ds-0001.png"], pictures
    for name in pictures:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pyXPCSViewer's own reader on a staged-out results file: the g2 of our JSON summary.
    if "pyXPCSViewer is not installed" not in out or os.environ.get("CI"):
        assert "(XpcsFile) opens ds-0000_results.hdf" in out and "MISMATCH" not in out, out[-2000:]


def test_nothing_is_left_in_the_users_home(run):
    assert sorted(str(p.relative_to(run["user_home"])) for p in run["user_home"].rglob("*")) == []
    assert (run["home"] / "matplotlib").is_dir()  # where matplotlib went instead


def _processes_naming(folder: Path) -> list[tuple[int, str]]:
    """Server, dashboard, daemons, launchers, mpiexec and job processes all name the
    demo's folder on their command line."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(folder) in arg for arg in proc.info["cmdline"] or ()):
                left.append((proc.info["pid"], " ".join(proc.info["cmdline"])[:200]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


def test_no_process_of_the_run_is_left(run):
    assert _processes_naming(run["home"]) == []
    for site in CAPS:
        lock = run["home"] / "sites" / site / ".site.lock"
        assert not lock.exists() or not _lock_alive(lock)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_a_demo_stopped_midway_leaves_nothing_running(tmp_path, how):
    """While the sites run: SIGTERM (what the test above sends a demo that overran, and
    what a terminal's Ctrl-C amounts to) and SIGHUP (the terminal closed: Python's default
    ended the demo without its cleanup) make the demo stop the server, the dashboard and
    the daemons, each started in a session of its own, before it exits. A demo killed
    outright cannot: the next run in its home (here `--stop-leftovers` alone) stops what
    it left."""
    from tests.support.waiting import wait_until

    home, out = tmp_path / "home", tmp_path / "demo.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "xpcs_demo.py"), "--home", str(home),
                                 "--datasets", "6", "--burst", "6", "--interval", "4"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: b"agent:" in out.read_bytes() or proc.poll() is not None,
                   "the demo's sites and dashboard to be up", 120)
        assert proc.poll() is None, out.read_text()[-4000:]
        # The server, the dashboard and the agent (noted once it started, after "agent:").
        noted = home / "processes.json"
        wait_until(lambda: len(json.loads(noted.read_text())) == 3, "the demo to note the agent", 60)
        started = [psutil.Process(p["pid"]) for p in json.loads(noted.read_text())]
        assert len(_processes_naming(home)) >= 5  # server, dashboard, three daemons
        proc.send_signal(getattr(signal, how))
        if how == "SIGKILL":
            assert proc.wait(60) == -signal.SIGKILL
            assert len(_processes_naming(home)) >= 5  # nothing stopped them
            again = subprocess.run([sys.executable, str(ROOT / "scripts" / "xpcs_demo.py"), "--home", str(home),
                                    "--stop-leftovers"], capture_output=True, text=True, cwd=ROOT, timeout=180)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "stopped 3 process(es) (server, dashboard, agent)" in again.stdout, again.stdout
        else:
            assert proc.wait(60) == 130, out.read_text()[-4000:]
        assert _processes_naming(home) == [], out.read_text()[-4000:]
        assert not any(p.is_running() for p in started)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "xpcs_demo.py"), "--home", str(home),
                        "--stop-leftovers"], capture_output=True, cwd=ROOT, timeout=180, check=False)


def _lock_alive(lock: Path) -> bool:
    try:
        return psutil.pid_exists(int(lock.read_text().strip()))
    except ValueError:
        return False


def _t(value: str | datetime) -> datetime:
    """SQLite hands back text, PostgreSQL datetimes; one kind per run either way."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value
