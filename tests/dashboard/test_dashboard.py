"""The dashboard in headless Chromium against a real server, site daemon and launcher
(conftest.py `world`). The tests run in file order and share the world: the live test's
finished jobs are the history test's subjects. Every page gets a screenshot."""

from __future__ import annotations

import json
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from .conftest import BULK_JOBS, World

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

    # The same through the form, by keyboard-reachable controls: site, tag, sort.
    visit(browser, world.url + "/jobs", "form.filters")
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
    assert all(abs((instant(p[3]) - instant(e[3])).total_seconds()) < 0.001 for p, e in zip(page, expected))
    assert page[-1][2] == "JOB_FINISHED"
    # Times are shown in the viewer's zone, not as the UTC text the server rendered.
    assert "UTC" not in browser.find_element(By.CSS_SELECTOR, "#history time").text
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

