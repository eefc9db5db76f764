"""What the benchmarks measure besides wall clock: CPU and memory of the processes involved,
including the database's own (PostgreSQL backends are processes of their own; a benchmark
that counts only the server's CPU hides the larger part of a bulk write), and the setup
several benchmarks share (call metadata, a site with an app to lease from, the import
path)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

# The repository, put on sys.path by importing this module: a benchmark run as
# `python scripts/bench_<x>.py` (scripts/ is on sys.path then) imports `from benchkit import
# ROOT` first, and balsam_grpc and tests from this checkout after it.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def print_figures(figures: dict[str, Any], as_json: bool, *, width: int = 32, indent: str = "") -> None:
    """A benchmark's figures: one JSON object (`--json`), or a line each, names aligned."""
    if as_json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{indent}{key:{width}s} {value}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


class DatabaseCpu:
    """CPU of the PostgreSQL backends serving one database (the server's pool), read from
    /proc for the pids pg_stat_activity lists, excluding this reader's own backend. A
    backend that exits between two readings loses what it spent since the first: the
    figure is a lower bound (the server's pool keeps its connections, so little is lost).
    SQLite has no process of its own: its work is in the server's CPU."""

    def __init__(self, url: str) -> None:
        self.conn = None
        if url.startswith("postgresql"):
            import psycopg
            from sqlalchemy.engine import make_url

            u = make_url(url)
            self.conn = psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username,
                                        password=u.password, dbname=u.database, autocommit=True)
            self.dbname = u.database

    def pids(self) -> list[int]:
        if self.conn is None:
            return []
        rows = self.conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                 (self.dbname,)).fetchall()
        return [int(r[0]) for r in rows]

    def reading(self) -> dict[int, float]:
        return {pid: cpu_s(pid) for pid in self.pids()}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (sampling from outside) on one process until stop_profiler: its collapsed
    stacks (GIL-holding samples) in `out`, for a flame graph or a sort."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--nonblocking",
                                "--gil", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before what it is to see starts
    return process


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`; reaped either way."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    spy.wait(30)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


def site_with_app(channel: Any, md: tuple[tuple[str, str], ...], name: str) -> tuple[int, int]:
    """A new site named `name` with one app, "true" (/bin/true): (site id, app id). The
    world a session benchmark leases from."""
    from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, site_pb2, site_service_pb2
    from balsam_grpc.v1 import site_service_pb2_grpc

    site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(
        site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=name)), metadata=md).site
    app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=site.id, name="true", command_template="/bin/true")), metadata=md).app
    return site.id, app.id
