"""The dashboard against a real federation, seen through a real browser.

`world` (one per module): a server process (SQLite: the dashboard reads only through the
API, which the server tests cover on both databases), site "alpha" made by `balsamctl
site init` with its daemon, elastic queue and launcher pilots on the local scheduler, a
site "bulk" with no daemon holding 10,000 jobs, a second user "bob" with a site and a job
of his own, and `balsamctl dashboard` as alice on a free loopback port.

`browser`: Debian's chromium driven by Selenium through the system chromedriver. Where
they are missing the browser tests skip with the reason, except under CI=true, where
scripts/run_tests.sh installs them and their absence is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from balsam_grpc.sdk import Client
from balsam_grpc.v1 import auth_service_pb2
from tests.site.sitekit import SiteKit
from tests.support.server_proc import free_port
from tests.support.waiting import wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
BULK_JOBS = 10_000
VIEWER_ZONE = "Asia/Tokyo"  # UTC+09:00 all year, and ICU calls it that too
FAST_SITE = dict(scheduler__poll_seconds=1, launcher__idle_timeout_s=30, elastic_queue__enabled=True,
                 elastic_queue__min_wall_time_min=5, elastic_queue__check_seconds=1, elastic_queue__max_nodes=1,
                 elastic_queue__max_total_nodes=2)
_screenshot_dirs: list[Path] = []


@dataclass
class World:
    kit: SiteKit
    alice: Client
    bob: Client
    url: str
    alpha_name: str
    bulk_site: Any
    bulk_ids: list[int]
    bob_site: Any
    bob_job: Any
    bob_password: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("dashboard-world")
    kit = SiteKit(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    alice = bob = None
    try:
        kit.start_server()
        # The site (balsamctl site init, its daemon) comes up while the jobs are made.
        site_up = ThreadPoolExecutor(1).submit(lambda: (kit.init_site(**FAST_SITE), kit.start_daemon()))
        alice = Client(kit.address, token=kit.token, timeout=60)

        bulk_site = alice.sites.create(name="bulk", hostname="bulk-login", path=str(tmp / "bulk"))
        bulk_app = alice.apps.create(site_id=bulk_site.id, name="Sim", command_template="true")
        from balsam_grpc.sdk import Job

        jobs = [Job(app=bulk_app, workdir=f"sweep/{i:05d}", tags={"group": "ab"[i % 2], "sweep": "s1"})
                for i in range(BULK_JOBS)]
        alice.jobs.bulk_create(jobs, chunk_size=BULK_JOBS)
        bulk_ids = [j.id for j in jobs]

        # Bob: another user with a site, an app and a job alice must never see.
        password = secrets.token_urlsafe(16)
        alice.call("AuthService", "CreateUser", auth_service_pb2.CreateUserRequest(username="bob", password=password))
        token = alice.call("AuthService", "Login", auth_service_pb2.LoginRequest(username="bob", password=password)).token
        bob = Client(kit.address, token=token, timeout=60)
        bob_site = bob.sites.create(name="bobs-secret-site", hostname="b", path="/b")
        bob_app = bob.apps.create(site_id=bob_site.id, name="BobApp", command_template="true")
        bob_job = bob.jobs.create(app=bob_app, workdir="bob/private-1", tags={"group": "a", "sweep": "s1"})

        port = free_port()
        log = open(tmp / "dashboard.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.cli.main", "dashboard", "--address",
                                 f"127.0.0.1:{port}"], env=kit.env, stdout=log, stderr=log, cwd=tmp)
        procs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dashboard exited: {(tmp / 'dashboard.log').read_text()[-3000:]}")
            return _listening(port)
        wait_until(up, "the dashboard to listen", 60)
        site_up.result(timeout=120)
        alpha_name = alice.sites.get(id=kit.site_id).name
        yield World(kit, alice, bob, f"http://127.0.0.1:{port}", alpha_name, bulk_site, bulk_ids, bob_site,
                    bob_job, password, procs)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for client in (alice, bob):
            if client is not None:
                client.close()
        kit.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["BALSAM_DASHBOARD_SCREENSHOTS"]) if os.environ.get("BALSAM_DASHBOARD_SCREENSHOTS") \
        else tmp_path_factory.mktemp("dashboard-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    _screenshot_dirs.append(folder)
    return folder


@pytest.fixture(scope="module")
def browser(screenshots: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        reason = (f"{', '.join(missing)} not installed (apt-get install -y chromium chromium-driver; "
                  "scripts/run_tests.sh does it under CI=true)")
        if IN_CI:
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # A viewer far from UTC: the pages must show times in the browser's zone. Chromium's
    # crash reporter writes under XDG_CONFIG_HOME whatever the profile: not the user's.
    service = Service(executable_path=CHROMEDRIVER, env={
        **os.environ, "TZ": VIEWER_ZONE, "XDG_CONFIG_HOME": str(tmp_path_factory.mktemp("chromium-config"))})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for folder in _screenshot_dirs:
        shots = sorted(p.name for p in folder.glob("*.png"))
        if shots:
            terminalreporter.write_line(f"dashboard screenshots ({len(shots)}) in {folder}")
