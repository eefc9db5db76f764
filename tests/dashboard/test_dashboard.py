"""The dashboard in headless Chromium against a real server, site daemon and launcher
(conftest.py `world`). The tests run in file order and share the world: the live test's
finished jobs are the history test's subjects. Every page gets a screenshot."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import statistics
from datetime import UTC, datetime, timedelta
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse
from zoneinfo import ZoneInfo

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from balsam_grpc.v1 import event_service_pb2

from .conftest import BULK_JOBS, VIEWER_ZONE, World
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)
DEADLINE = 90  # generous: 2 shared cores; nothing below is a timing assertion
shared: dict[str, Any] = {}


def shot(browser: Any, folder: Path, name: str) -> None:
    browser.save_screenshot(str(folder / f"{name}.png"))


def visit(browser: Any, url: str, ready: str) -> None:
    browser.get(url)
    WebDriverWait(browser, DEADLINE).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready))


def wait_js(browser: Any, script: str, what: str, timeout: float = DEADLINE) -> Any:
    return WebDriverWait(browser, timeout).until(lambda d: d.execute_script(script), f"waiting for {what}")


def wait_live(browser: Any) -> None:
    wait_js(browser, "return window.__dash && window.__dash.opened > 0", "the event stream to open")


def row_ids(browser: Any) -> list[int]:
    return [int(i) for i in browser.execute_script(
        "return Array.from(document.querySelectorAll('#jobs tbody tr')).map(r => r.dataset.jobId)")]


def match_count(browser: Any) -> int:
    text = wait_js(browser, "const t = document.getElementById('match-count').textContent;"
                            "return /match/.test(t) && t", "the match count")
    return int(re.sub(r"\D", "", text.split("job")[0]))


def test_overview_shows_sites_counts_and_charts(world: World, browser: Any, screenshots: Path) -> None:
    visit(browser, world.url + "/", "#sites tbody tr")
    wait_live(browser)
    rows = {r.find_element(By.CSS_SELECTOR, "th").text.split("\n")[0]: r.text
            for r in browser.find_elements(By.CSS_SELECTOR, "#sites tbody tr")}
    assert set(rows) == {world.alpha_name, "bulk"}, rows
    assert "connected" in rows[world.alpha_name] and "disconnected" not in rows[world.alpha_name]
    assert "disconnected" in rows["bulk"]
    assert "10,000" in rows["bulk"]  # its backlog
    cards = {c.get_attribute("data-state"): c.text for c in browser.find_elements(By.CSS_SELECTOR, "#state-counts li")}
    assert "10,000" in cards["PREPROCESSED"], cards
    wait_js(browser, "return document.querySelectorAll('#charts .chart').length === 3", "the charts")
    shot(browser, screenshots, "01-overview")
    browser.set_window_size(2560, 1440)  # a wall screen
    shot(browser, screenshots, "01-overview-wall")
    browser.set_window_size(1440, 1000)


def test_jobs_created_through_the_sdk_appear_run_and_finish_live(world: World, browser: Any,
                                                                 screenshots: Path) -> None:
    visit(browser, world.url + "/jobs?" + urlencode({"site": world.alpha_name}), "#jobs")
    wait_live(browser)
    browser.execute_script("window.__sameDocument = true")
    jobs = [world.alice.jobs.create(app="Echo", site=world.kit.site_id, workdir=f"live/{i}",
                                    node_packing_count=8) for i in range(3)]
    ids = [j.id for j in jobs]
    shared["finished_ids"] = ids
    for jid in ids:
        wait_js(browser, f"return window.__dash.seen['{jid}:JOB_FINISHED']", f"job {jid} to finish on the page")
    assert browser.execute_script("return window.__sameDocument") is True  # updated in place, never reloaded
    shown = {int(r.get_attribute("data-job-id")): r.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-state")
             for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")}
    assert all(shown[jid] == "JOB_FINISHED" for jid in ids), shown
    # Event commit time -> the state on the page (same machine clock): printed, not asserted.
    seen = browser.execute_script("return window.__dash.seen")
    lags = []
    for jid in ids:
        for event in world.alice.events.filter(job=jid):
            key = f"{jid}:{event.to_state}"
            if key in seen:
                lags.append(seen[key] / 1000 - event.time.timestamp())
    assert lags
    print(f"\nDASHBOARD live lag, event -> shown on page: median {statistics.median(lags) * 1000:.0f} ms, "
          f"max {max(lags) * 1000:.0f} ms over {len(lags)} state changes")
    shot(browser, screenshots, "02-jobs-live")


def test_filter_and_keyset_paging_over_10000_jobs(world: World, browser: Any, screenshots: Path) -> None:
    expected = [j.id for j in world.alice.jobs.filter(site="bulk", tags={"group": "a"}).order_by("-id")[:1000]]
    visit(browser, world.url + "/jobs?" + urlencode({"site": "bulk", "tag": "group=a", "page_size": 500}),
          "#jobs tbody tr")
    assert match_count(browser) == BULK_JOBS // 2
    assert row_ids(browser) == expected[:500]
    shot(browser, screenshots, "03-jobs-filtered-page1")
    browser.find_element(By.ID, "next-page").click()
    WebDriverWait(browser, DEADLINE).until(lambda d: "Page 2" in d.find_element(By.CSS_SELECTOR, ".pager").text)
    assert row_ids(browser) == expected[500:1000]
    shot(browser, screenshots, "04-jobs-filtered-page2")
    browser.find_element(By.CSS_SELECTOR, "a[rel=prev]").click()
    WebDriverWait(browser, DEADLINE).until(lambda d: "Page 1" in d.find_element(By.CSS_SELECTOR, ".pager").text)
    assert row_ids(browser) == expected[:500]

    # The same through the form, by keyboard-reachable controls: site, tag, sort; "/" jumps to it.
    visit(browser, world.url + "/jobs", "form.filters")
    browser.find_element(By.TAG_NAME, "body").send_keys("/")
    assert browser.switch_to.active_element.get_attribute("id") == "f-state"
    Select(browser.find_element(By.ID, "f-site")).select_by_visible_text("bulk")
    browser.find_element(By.ID, "f-tag").send_keys("group=b")
    Select(browser.find_element(By.ID, "f-order")).select_by_value("id")
    browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    WebDriverWait(browser, DEADLINE).until(lambda d: parse_qs(urlparse(d.current_url).query).get("tag") == ["group=b"])
    assert match_count(browser) == BULK_JOBS // 2
    ids = row_ids(browser)
    assert ids == sorted(ids) and len(ids) == 100
    assert all("group=b" in t.text for t in browser.find_elements(By.CSS_SELECTOR, "#jobs td.tags"))


def test_job_page_history_matches_balsamctl(world: World, browser: Any, screenshots: Path) -> None:
    jid = shared["finished_ids"][0]
    visit(browser, f"{world.url}/jobs/{jid}", "#history tbody tr")
    page = [(int(r.get_attribute("data-event-id")), r.find_element(By.CSS_SELECTOR, "td.from").text,
             r.find_element(By.CSS_SELECTOR, "td.to .badge").get_attribute("data-state"),
             r.find_element(By.CSS_SELECTOR, "time").get_attribute("datetime"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")]
    cli = json.loads(world.kit.balsamctl("job", "history", str(jid), "-o", "json").stdout)

    def state(text: str) -> str:
        return text.removeprefix("JOB_STATE_") if text else "UNSPECIFIED"

    def instant(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)

    expected = [(int(e["id"]), state(e["jobState"].get("fromState", "")), state(e["jobState"]["toState"]),
                 e["time"]) for e in cli]
    assert [p[:3] for p in page] == [e[:3] for e in expected]
    assert all(abs((instant(p[3]) - instant(e[3])).total_seconds()) < 0.001 for p, e in zip(page, expected, strict=True))
    assert page[-1][2] == "JOB_FINISHED"
    # Times are shown in the viewer's zone (the browser's), not as the UTC the server rendered.
    assert browser.find_element(By.ID, "tz").text == VIEWER_ZONE
    zone = ZoneInfo(VIEWER_ZONE)
    shown = browser.find_element(By.CSS_SELECTOR, "#history time")
    local = instant(shown.get_attribute("datetime")).astimezone(zone)
    # Today's as the time of day, older ones with the date (either, should midnight pass meanwhile).
    assert shown.text in (local.strftime("%H:%M:%S"), local.strftime("%Y-%m-%d %H:%M:%S"))
    assert local.utcoffset() == timedelta(hours=9)
    shot(browser, screenshots, "05-job-history")


def test_kill_from_the_page_kills_the_job(world: World, browser: Any, screenshots: Path) -> None:
    jid = world.bulk_ids[0]
    visit(browser, f"{world.url}/jobs/{jid}", "#job-state")
    browser.find_element(By.LINK_TEXT, "Kill…").click()
    WebDriverWait(browser, DEADLINE).until(lambda d: d.find_elements(By.ID, "confirm-kill"))
    assert world.alice.jobs.get(id=jid).state == "PREPROCESSED"  # asking changed nothing
    shot(browser, screenshots, "06-kill-confirm")
    browser.find_element(By.ID, "reason").send_keys("stopped from the browser test")
    browser.find_element(By.ID, "confirm-kill").click()
    WebDriverWait(browser, DEADLINE).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#job-state .badge[data-state=KILLED]"))
    job = world.alice.jobs.get(id=jid)
    assert job.state == "KILLED" and job.state_message == "stopped from the browser test"
    assert not browser.find_elements(By.LINK_TEXT, "Kill…")  # a final job offers no kill
    shot(browser, screenshots, "07-job-killed")


def test_retry_from_the_page_runs_the_killed_job_again(world: World, browser: Any, screenshots: Path) -> None:
    from balsam_grpc.dashboard.reads import RETRY_AVAILABLE

    if not RETRY_AVAILABLE:
        pytest.skip("the contract has no RetryJobs yet: the page offers kill only")
    jid = world.bulk_ids[0]  # killed by the test before
    visit(browser, f"{world.url}/jobs/{jid}", "#job-state")
    browser.find_element(By.LINK_TEXT, "Retry…").click()
    WebDriverWait(browser, DEADLINE).until(lambda d: d.find_elements(By.ID, "confirm-retry"))
    assert world.alice.jobs.get(id=jid).state == "KILLED"  # asking changed nothing
    shot(browser, screenshots, "07b-retry-confirm")
    browser.find_element(By.ID, "confirm-retry").click()
    shown = WebDriverWait(browser, DEADLINE).until(
        lambda d: [b.get_attribute("data-state") for b in d.find_elements(By.CSS_SELECTOR, "#job-state .badge")
                   if b.get_attribute("data-state") != "KILLED"])
    state = world.alice.jobs.get(id=jid).state
    assert shown == [state] and state in ("RESTART_READY", "PREPROCESSED")  # runnable again
    assert browser.find_elements(By.LINK_TEXT, "Kill…") and not browser.find_elements(By.LINK_TEXT, "Retry…")

def test_batch_jobs_and_transfers_pages(world: World, browser: Any, screenshots: Path) -> None:
    visit(browser, world.url + "/batch-jobs", "#batch-jobs tbody tr")
    pilots = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#batch-jobs tbody tr")]
    pilot = world.kit.batch_jobs()[0]
    assert any(world.alpha_name in text and pilot.scheduler_id in text for text in pilots), pilots
    shot(browser, screenshots, "08-batch-jobs")
    visit(browser, world.url + "/transfers", "main h1")
    assert "No transfer items match" in browser.find_element(By.ID, "listing-live").text
    shot(browser, screenshots, "09-transfers")


def test_another_users_objects_never_appear(world: World, browser: Any, screenshots: Path) -> None:
    bob_job, bob_site = world.bob_job, world.bob_site

    def clean(*echoed: str) -> None:
        """Nothing of bob's on the page but what the URL itself asked for (the filter
        form shows the query back)."""
        source = browser.page_source
        for secret in ("bob/private-1", "bobs-secret-site", "BobApp"):
            if secret not in echoed:
                assert secret not in source, (secret, browser.current_url)
        assert bob_job.id not in row_ids(browser)
        options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "select option")]
        assert "bobs-secret-site" not in options and "BobApp" not in options

    visit(browser, f"{world.url}/jobs/{bob_job.id}", "main h1")
    assert browser.find_element(By.CSS_SELECTOR, "main h1").text == "Not found"
    clean()
    shot(browser, screenshots, "10-other-users-job")
    for query in ({"site": bob_site.name}, {"site": str(bob_site.id)}, {"app": "BobApp"}):
        visit(browser, world.url + "/jobs?" + urlencode(query), "#match-count")
        assert match_count(browser) == 0 and row_ids(browser) == [], query
        clean(*query.values())
    # Bob's job is the newest of all and carries the same tags as alice's group "a".
    visit(browser, world.url + "/jobs?" + urlencode({"tag": "group=a", "page_size": 50}), "#jobs tbody tr")
    assert len(row_ids(browser)) == 50
    clean()
    for path, echoed in ((f"/jobs/rows?ids={bob_job.id}", ()), (f"/jobs/{bob_job.id}/live", ()),
                         (f"/jobs/{bob_job.id}/kill", ()), ("/", ()), ("/transfers", ()),
                         ("/batch-jobs?site=bobs-secret-site", ("bobs-secret-site",))):
        browser.get(world.url + path)
        clean(*echoed)
    assert world.bob.jobs.get(id=bob_job.id).state != "KILLED"


def test_a_burst_of_events_is_applied_in_a_few_batches(world: World, browser: Any, screenshots: Path) -> None:
    """3,000 new jobs in a second or two: the page receives every event, in a handful of
    coalesced messages, and its overview shows the new site's backlog."""
    from balsam_grpc.sdk import Job

    visit(browser, world.url + "/", "#sites tbody tr")
    wait_live(browser)
    site = world.alice.sites.create(name="burst", hostname="burst-login", path="/burst")
    app = world.alice.apps.create(site_id=site.id, name="Tiny", command_template="true")
    before = browser.execute_script("return [window.__dash.events, window.__dash.batches]")
    for round_ in range(3):
        world.alice.jobs.bulk_create([Job(app=app, workdir=f"burst/{round_}/{i}") for i in range(1000)],
                                     chunk_size=1000)
    wait_js(browser, f"return window.__dash.events >= {before[0] + 3000}", "3,000 events on the page")
    events, batches = browser.execute_script("return [window.__dash.events, window.__dash.batches]")
    print(f"\nDASHBOARD burst: {events - before[0]} events reached the page in {batches - before[1]} messages")
    assert batches - before[1] <= 30
    wait_js(browser, "return Array.from(document.querySelectorAll('#sites tbody tr')).some("
                     "r => r.textContent.includes('burst') && r.textContent.includes('3,000'))",
            "the overview to show the burst site's backlog")
    assert browser.execute_script("return 1 + 1") == 2  # the page still answers
    shot(browser, screenshots, "11-overview-after-burst")

# ------------------------------------------------------------------ the stream and the guards, over HTTP

def sse_frames(world: World, stop: Any, *, cursor: str = "", last_event_id: str = "") -> list[tuple[str, dict]]:
    """(id, batch) of each data message of /events, read until stop(frames) holds."""
    url = urlparse(world.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE)
    headers = {"accept": "text/event-stream", **({"last-event-id": last_event_id} if last_event_id else {})}
    conn.request("GET", "/events" + (f"?cursor={cursor}" if cursor else ""), headers=headers)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    frames: list[tuple[str, dict]] = []
    fields: dict[str, str] = {}
    try:
        while not stop(frames):
            line = response.readline().decode().rstrip("\r\n")
            if line:
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
                continue
            if "data" in fields and fields.get("event", "message") == "message":
                frames.append((fields.get("id", ""), json.loads(fields["data"])))
            fields = {}
    finally:
        conn.close()
    return frames


def created(frames: list[tuple[str, dict]]) -> list[int]:
    return [jid for _, batch in frames for jid in batch["created"]]


def test_stream_resumes_after_last_event_id_without_loss_or_repeat(world: World) -> None:
    from balsam_grpc.sdk import Job

    newest = world.alice.call("EventService", "ListEvents", event_service_pb2.ListEventsRequest(
        page_size=1, descending=True)).events[0].id
    app = world.alice.apps.get(site_id=world.bulk_site.id, name="Sim")

    def burst(tag: str, n: int) -> list[int]:
        jobs = [Job(app=app, workdir=f"stream/{tag}/{i}", tags={"stream": tag}) for i in range(n)]
        return [j.id for j in world.alice.jobs.bulk_create(jobs, chunk_size=n)]

    first = burst("one", 400)
    frames1 = sse_frames(world, lambda f: len(f) >= 1, cursor=str(newest))  # then the browser goes away
    bobs = world.bob.jobs.create(app=world.bob.apps.get(name="BobApp"), workdir="bob/private-2")
    second = burst("two", 400)
    wanted = set(first + second)
    frames2 = sse_frames(world, lambda f: wanted <= set(created(frames1 + f)), cursor=str(newest),
                         last_event_id=frames1[-1][0])  # EventSource resends its last id
    delivered = created(frames1) + created(frames2)
    assert sorted(delivered) == sorted(wanted)  # every new job once: none lost, none repeated
    assert bobs.id not in delivered and all(str(bobs.id) not in b["jobs"] for _, b in frames1 + frames2)
    assert all(int(i) > int(frames1[-1][0]) for i, _ in frames2)  # ids are cursors, increasing
    events = sum(b["events"] for _, b in frames1 + frames2)
    frames = len(frames1) + len(frames2)
    print(f"\nDASHBOARD stream: {events} events in {frames} messages")
    assert frames * 20 <= events  # coalesced, not one message per event


def test_guards_refuse_forged_actions_and_foreign_hosts(world: World) -> None:
    url = urlparse(world.url)
    victim = world.bulk_ids[1]

    def request(method: str, path: str, body: str = "", **headers: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE)
        conn.request(method, path, body=body, headers={"content-type": "application/x-www-form-urlencoded",
                                                       **headers})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        return response.status, text

    status, page = request("GET", f"/jobs/{victim}/kill")
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    # Another web page posting to the loopback dashboard has no token; a wrong Origin is refused.
    assert request("POST", f"/jobs/{victim}/kill", "reason=x")[0] == 403
    assert request("POST", f"/jobs/{victim}/kill", f"csrf={token}", origin="http://evil.example")[0] == 403
    # DNS rebinding: a foreign Host name gets nothing.
    assert request("GET", "/jobs", host="evil.example")[0] == 400
    assert world.alice.jobs.get(id=victim).state == "PREPROCESSED"
    # Bob's job by URL, even with a valid token: not found, and untouched.
    assert request("POST", f"/jobs/{world.bob_job.id}/kill", f"csrf={token}")[0] == 404
    assert world.bob.jobs.get(id=world.bob_job.id).state == "PREPROCESSED"
    assert request("GET", "/events?cursor=abc")[0] == 400
    assert request("GET", "/jobs?state=NOPE")[0] == 400
    # A page token the URL mangled is the URL's fault, not a failing server (was 502).
    status, page = request("GET", "/jobs?page_token=zzz")
    assert status == 400 and "page_token is corrupt" in page


@contextlib.contextmanager
def in_process_dashboard(world: World, *, login_required: bool) -> Iterator[int]:
    """The dashboard app under uvicorn in a thread of the test (its internals visible)."""
    import threading

    import uvicorn

    from balsam_grpc.dashboard.app import DashboardConfig, create_app
    from balsam_grpc.sdk import Client
    from tests.support.server_proc import free_port

    def make_client(token: str | None) -> Client:
        return Client(world.kit.address, token=world.kit.token if token is None else token, timeout=60)

    app = create_app(DashboardConfig(login_required=login_required, allowed_hosts=["*"], make_client=make_client))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the in-process dashboard to start", 30)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_closed_page_ends_its_upstream_watch(world: World) -> None:
    from balsam_grpc.dashboard import live

    newest = world.alice.call("EventService", "ListEvents", event_service_pb2.ListEventsRequest(
        page_size=1, descending=True)).events[0].id
    with in_process_dashboard(world, login_required=False) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
        conn.request("GET", f"/events?cursor={newest}")
        response = conn.getresponse()
        assert response.readline().startswith(b"retry:")
        relays = list(live._open)
        assert relays and all(r._thread.is_alive() for r in relays)
        conn.close()  # the tab closes
        wait_until(lambda: not any(r._thread.is_alive() for r in relays), "the upstream watch to end", DEADLINE)


def test_a_remote_dashboard_asks_each_viewer_to_log_in(world: World) -> None:
    """The mode a non-loopback bind gets (serve() adds TLS): no profile user; each
    browser logs in and sees only what its own balsam user sees."""
    with in_process_dashboard(world, login_required=True) as port:
        check_login_flow(world, port)


def check_login_flow(world: World, port: int) -> None:
    def request(method: str, path: str, body: str = "", cookie: str = "") -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
        conn.request(method, path, body=body, headers={"content-type": "application/x-www-form-urlencoded",
                                                       **({"cookie": cookie} if cookie else {})})
        response = conn.getresponse()
        response.text = response.read().decode()  # type: ignore[attr-defined]
        conn.close()
        return response

    first = request("GET", "/jobs")
    assert first.status == 303 and first.getheader("location") == "/login?next=/jobs"
    assert request("GET", "/events").status == 401
    assert request("POST", "/login?next=/jobs", "username=bob&password=wrong").status == 401
    login = request("POST", "/login?next=/jobs", f"username=bob&password={world.bob_password}")
    assert login.status == 303 and login.getheader("location") == "/jobs"
    set_cookie = login.getheader("set-cookie")
    assert "httponly" in set_cookie.lower() and "samesite=strict" in set_cookie.lower()
    cookie = set_cookie.split(";")[0]
    jobs = request("GET", "/jobs", cookie=cookie)
    assert jobs.status == 200 and "bob/private-1" in jobs.text and "sweep/00000" not in jobs.text
    assert request("GET", f"/jobs/{world.bulk_ids[2]}", cookie=cookie).status == 404  # alice's
    token = re.search(r'name="csrf" value="([^"]+)"', jobs.text).group(1)
    assert request("POST", "/logout", f"csrf={token}", cookie=cookie).status == 303
    assert request("GET", "/jobs", cookie=cookie).status == 303  # the session is gone
