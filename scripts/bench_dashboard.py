#!/usr/bin/env python3
"""The dashboard over a big PostgreSQL database: how fast the first pages come.

Usage: scripts/bench_dashboard.py [-n 1000000] [--database URL] [--keep] [--repeat 5] [--json]

Starts a server on PostgreSQL (default: a fresh database balsam_bench_dashboard at
127.0.0.1:5432, dropped at the end unless --keep), creates three sites and 10,000 jobs
through the API, then multiplies the jobs to N in SQL (one creation event each, created
over the last 30 days: 90% JOB_FINISHED, 6% PREPROCESSED, 3% FAILED, 1% KILLED; the API
path would take an hour for a million on two cores, and the dashboard only reads). It
starts `balsamctl dashboard` and prints, best and median of --repeat:

- overview first paint: the HTML of / (sites, statistics, counts by state and site,
  failures), and, when Debian's chromium is installed, the browser's first contentful
  paint of it; the charts' data (/api/analytics) comes after the paint and is printed apart;
- jobs first page: the HTML of /jobs (100 newest jobs), of a filtered page (state + site +
  tag), and of the count shown under the heading (/jobs/count, fetched after the paint).

Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchkit import ROOT, stop_process  # first: puts this checkout on sys.path

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from balsam_grpc.core.settings import Profile  # noqa: E402
from balsam_grpc.sdk import Client, Job  # noqa: E402

DEFAULT_DB = "balsam_bench_dashboard"
PG = "host=127.0.0.1 port=5432 user=postgres"
API_JOBS = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen within {timeout:g} s")


def populate(client: Client, dsn: str, n: int) -> None:
    apps = []
    for name in ("aurora", "polaris", "perlmutter"):
        site = client.sites.create(name=name, hostname=f"{name}-login", path=f"/sites/{name}")
        apps.append(client.apps.create(site_id=site.id, name="Reduce", command_template="true"))
    t0 = time.monotonic()
    jobs = [Job(app=apps[i % 3], workdir=f"api/{i}", tags={"exp": "bench", "k": str(i % 10)})
            for i in range(API_JOBS)]
    client.jobs.bulk_create(jobs, chunk_size=API_JOBS)
    print(f"created {API_JOBS:,} jobs through the API in {time.monotonic() - t0:.1f} s", flush=True)
    rest = max(0, n - API_JOBS)
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        last_id = conn.execute("SELECT max(id) FROM jobs").fetchone()[0]
        per_site = rest // 3
        for index, app in enumerate(apps):
            count = per_site + (rest - 3 * per_site if index == 2 else 0)
            conn.execute("""
                INSERT INTO jobs (owner_id, site_id, app_id, name, workdir, tags, parameters, data, transfers,
                    num_nodes, ranks_per_node, threads_per_rank, threads_per_core, gpus_per_rank, node_packing_count,
                    wall_time_min, launch_params, priority, state, state_message, error_tail, lease_generation,
                    on_parent_failure, run_count, pending_parents, parent_ids, create_time, update_time, state_time)
                SELECT t.owner_id, t.site_id, t.app_id, '', 'bulk/' || g, jsonb_build_object('exp', 'bench', 'k',
                    (g %% 10)::text), '{}', '{}', '{}', 1, 1, 1, 1, 0, 1, 0, '{}', 0,
                    CASE WHEN g %% 100 < 90 THEN 'JOB_FINISHED' WHEN g %% 100 < 96 THEN 'PREPROCESSED'
                         WHEN g %% 100 < 99 THEN 'FAILED' ELSE 'KILLED' END,
                    CASE WHEN g %% 100 BETWEEN 96 AND 98 THEN 'exit code 1: synthetic failure' ELSE '' END, '', 0,
                    'FAIL', 1, 0, '[]', ts, ts, ts
                FROM generate_series(1, %(count)s) AS g
                CROSS JOIN LATERAL (SELECT now() - interval '30 days' + (g * interval '30 days') / %(count)s AS ts) AS c
                CROSS JOIN (SELECT owner_id, site_id, app_id FROM jobs WHERE app_id = %(app)s LIMIT 1) AS t
                """, {"count": count, "app": app.id})
        conn.execute("""
            INSERT INTO events (owner_id, site_id, job_id, kind, from_state, to_state, time, data, message)
            SELECT owner_id, site_id, id, 'job_state', 'CREATED', state, state_time, NULL, state_message
            FROM jobs WHERE id > %s ORDER BY state_time
            """, (last_id,))
        conn.execute("ANALYZE")
        total = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    print(f"multiplied to {total:,} jobs (and one event each) in SQL in {time.monotonic() - t0:.1f} s", flush=True)


def fetch_ms(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        response.read()
    return (time.perf_counter() - t0) * 1000


def browser_paint_ms(url: str, repeat: int) -> list[float]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return []
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # Chromium's crash reporter writes under XDG_CONFIG_HOME whatever the profile: not the user's.
    service = Service(executable_path=shutil.which("chromedriver"),
                      env={**os.environ, "XDG_CONFIG_HOME": os.path.join(profile, "config")})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        out = []
        for _ in range(repeat + 1):  # the first load warms the browser's caches
            driver.get(url)
            paint = driver.execute_script(
                "const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null")
            if paint is not None:
                out.append(float(paint))
            # Let the page's chart request finish, so the next load does not queue behind it.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not driver.execute_script(
                    "return document.querySelectorAll('#charts .chart').length > 0 || "
                    "/could not/.test(document.getElementById('charts').textContent)"):
                time.sleep(0.2)
        return out[1:]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def summary(values: list[float]) -> dict[str, float]:
    return {"best_ms": round(min(values), 1), "median_ms": round(statistics.median(values), 1)} if values else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1_000_000, help="jobs in the database")
    p.add_argument("--database", default="", help=f"PostgreSQL URL (default: a fresh {DEFAULT_DB})")
    p.add_argument("--keep", action="store_true", help="keep the database made here")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    made_db = not a.database
    if made_db:
        with psycopg.connect(PG + " dbname=postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DEFAULT_DB)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEFAULT_DB)))
        a.database = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DEFAULT_DB}"
    dsn = a.database.replace("postgresql+psycopg://", "postgresql://")
    home = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(BALSAM_HOME=str(home), BALSAM_LOG_LEVEL="WARNING")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"127.0.0.1:{port}",
                                   "--database", a.database], env=env, cwd=ROOT)
        procs.append(server)
        wait_listening(port, server, "the server")
        deadline = time.monotonic() + 60
        while not ((home / "profile.json").exists() and
                   Profile.load(home / "profile.json", apply_env=False).server.endswith(f":{port}")):
            if time.monotonic() > deadline:
                raise SystemExit("the server wrote no profile within 60 s")
            time.sleep(0.1)
        profile = Profile.load(home / "profile.json", apply_env=False)
        with Client(f"127.0.0.1:{port}", token=profile.token, timeout=600) as client:
            populate(client, dsn, a.n)
        dport = free_port()
        dashboard = subprocess.Popen([sys.executable, "-m", "balsam_grpc.cli.main", "dashboard", "--address",
                                      f"127.0.0.1:{dport}"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        procs.append(dashboard)
        wait_listening(dport, dashboard, "the dashboard")
        base = f"http://127.0.0.1:{dport}"
        pages = {
            "overview_html": "/",
            "overview_charts_json": "/api/analytics?window=1h",
            "jobs_first_page_html": "/jobs",
            "jobs_filtered_page_html": "/jobs?state=FAILED&site=polaris&tag=k%3D3",
            "jobs_count_json": "/jobs/count",
        }
        fetch_ms(base + "/")  # connections and caches warm
        results = {name: summary([fetch_ms(base + path) for _ in range(a.repeat)]) for name, path in pages.items()}
        results["overview_first_contentful_paint"] = summary(browser_paint_ms(base + "/", a.repeat))
        results["jobs"] = a.n
        if a.json:
            print(json.dumps(results))
        else:
            print(f"\ndashboard over {a.n:,} jobs in PostgreSQL (best / median of {a.repeat}):")
            for name, figures in results.items():
                if isinstance(figures, dict) and figures:
                    print(f"  {name:34s} {figures['best_ms']:8.1f} ms / {figures['median_ms']:8.1f} ms")
                elif isinstance(figures, dict):
                    print(f"  {name:34s} (chromium not installed)")
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)
        if made_db and not a.keep:
            with psycopg.connect(PG + " dbname=postgres", autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEFAULT_DB)))


if __name__ == "__main__":
    sys.exit(main())
