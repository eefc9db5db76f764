"""The rest of balsamctl against a real server process: login and whoami, app sync/ls/rm,
queue submit/ls/rm, events (list and follow), job watch, analytics, help and output
conventions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from balsam_grpc.v1 import auth_service_pb2, job_pb2, site_pb2, site_service_pb2
from tests.cli.conftest import CliServer, one_error_line

S = job_pb2

APPS_PY = textwrap.dedent('''
    from balsam_grpc.core.appdef import ApplicationDefinition


    class Greeter(ApplicationDefinition):
        """Says hello."""
        command_template = "echo hello {{ who }} {{ times }}"
        parameters = {"who": {"required": True, "help": "whom to greet"},
                      "times": {"type": "int", "default": 1}}
''')


@pytest.fixture(scope="module")
def site(cli_server: CliServer, tmp_path_factory: pytest.TempPathFactory) -> site_pb2.Site:
    root = tmp_path_factory.mktemp("site")
    (root / "apps").mkdir()
    (root / "apps" / "greet.py").write_text(APPS_PY)
    return cli_server.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name="mini", hostname="localhost", path=str(root)))).site


@pytest.fixture(scope="module")
def synced(cli_server: CliServer, site: site_pb2.Site) -> None:
    result = cli_server.run("app", "sync", "--site", "mini")
    assert result.returncode == 0, result.stderr
    assert "created: Greeter" in result.stdout


def test_app_sync_ls_and_rm(cli_server: CliServer, site: site_pb2.Site, synced: None) -> None:
    again = cli_server.run("app", "sync", "--site", "mini")
    assert again.returncode == 0 and "unchanged: Greeter" in again.stdout
    (app,) = cli_server.json("app", "ls", "--site", "mini")
    assert app["name"] == "Greeter" and app["commandTemplate"].startswith("echo hello")
    table = cli_server.run("app", "ls", "--site", "mini")
    assert "who*, times:int" in table.stdout  # * marks the required parameter
    # A job of the synced app is checked against its declaration before sending.
    bad = cli_server.run("job", "create", "--app", "Greeter", "--site", "mini", "-w", "g/0", "-p", "times=2")
    assert bad.returncode == 2 and "requires parameter 'who' (whom to greet)" in bad.stderr
    good = cli_server.run("job", "create", "--app", "Greeter", "--site", "mini", "-w", "g/0", "-p", "who=you")
    assert good.returncode == 0, good.stderr
    refused = cli_server.run("app", "rm", "Greeter", "--site", "mini", "--yes")
    assert refused.returncode == 1
    assert refused.stderr.count("error:") == 2  # the app's own failure, then the summary
    assert len(cli_server.json("app", "ls", "--site", "mini")) == 1
    assert cli_server.run("job", "rm", "--app", "Greeter", "--yes").returncode == 0
    removed = cli_server.run("app", "rm", "Greeter", "--site", "mini", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert cli_server.json("app", "ls", "--site", "mini") == []
    assert cli_server.run("app", "sync", "--site", "mini").returncode == 0  # back for the other tests


def test_app_sync_refuses_a_bad_declaration(cli_server: CliServer, site: site_pb2.Site,
                                            tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(APPS_PY.replace('"type": "int"', '"type": "integer"'))
    result = cli_server.run("app", "sync", "--site", "mini", "--folder", str(tmp_path))
    assert result.returncode == 2
    assert "unknown type 'integer'" in result.stderr and len(result.stderr.splitlines()) == 1


def test_queue_submit_ls_rm(cli_server: CliServer, site: site_pb2.Site) -> None:
    (created,) = cli_server.json("queue", "submit", "--site", "mini", "-n", "2", "-t", "30", "--job-mode", "serial",
                                 "--tag", "exp=q")
    assert created["state"] == "PENDING_SUBMISSION" and created["numNodes"] == 2
    assert created["filterTags"] == {"exp": "q"} and created["jobMode"] == "SERIAL"
    listed = cli_server.json("queue", "ls", "--site", "mini")
    assert [b["id"] for b in listed] == [created["id"]]
    refused = cli_server.run("queue", "rm", str(created["id"]), stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "refusing to delete 1 batch job(s)" in refused.stderr
    dry = cli_server.run("queue", "rm", str(created["id"]), "--dry-run")
    assert dry.returncode == 0 and f"{created['id']} (delete, PENDING_SUBMISSION)" in dry.stdout
    done = cli_server.run("queue", "rm", str(created["id"]), "99999", "--yes")
    assert done.returncode == 1  # one of the two did not exist: reported, not silent
    assert f"deleted batch job {created['id']}" in done.stdout
    assert "batch job 99999:" in done.stderr and "(NOT_FOUND)" in done.stderr
    assert cli_server.json("queue", "ls", "--all") == []
    bad = cli_server.run("queue", "submit", "--site", "mini", "-n", "1", "-t", "5", "--job-mode", "parallel")
    assert bad.returncode == 2 and "--job-mode: 'parallel' is not one of: serial, mpi" in bad.stderr


def test_queue_rm_cancels_a_pending_batch_job_its_daemon_may_be_submitting(cli_server: CliServer,
                                                                         site: site_pb2.Site) -> None:
    from sqlalchemy import create_engine, update

    from balsam_grpc.server.store.tables import sites

    (created,) = cli_server.json("queue", "submit", "--site", "mini", "-n", "1", "-t", "10")
    engine = create_engine(cli_server.server.database_url)
    try:
        def connected(value: bool) -> None:
            with engine.begin() as conn:  # as if the site's daemon held its stream
                conn.execute(update(sites).where(sites.c.id == site.id).values(connected=value))

        connected(True)
        done = cli_server.run("queue", "rm", str(created["id"]), "--yes")
        connected(False)
    finally:
        engine.dispose()
    assert done.returncode == 0, done.stderr
    assert f"cancelling batch job {created['id']}" in done.stdout
    (left,) = cli_server.json("queue", "ls", "--all", "--site", "mini")
    assert left["id"] == created["id"] and left["state"] == "PENDING_DELETION"


def _job(cli_server: CliServer, workdir: str, tag: str) -> int:
    (job,) = cli_server.json("job", "create", "--app", "Greeter", "--site", "mini", "-w", workdir, "-p", "who=x",
                             "--tag", tag)
    return int(job["id"])


def _move(cli_server: CliServer, job_id: int, *states: int) -> None:
    assert states[0] == S.JOB_STATE_RUNNING  # leased, then the launcher's reports
    cli_server.run_job(job_id, *states[1:])


def test_events_list_and_follow(cli_server: CliServer, synced: None) -> None:
    job_id = _job(cli_server, "ev/0", "exp=events")
    listed = cli_server.json("events", "--job", str(job_id))
    assert listed and all(e["jobId"] == job_id for e in listed)
    assert listed[-1]["jobState"]["toState"] == "PREPROCESSED"
    newest = cli_server.json("events", "--newest", "-n", "1")
    assert int(newest[0]["id"]) >= int(listed[-1]["id"])
    assert cli_server.json("events", "--job", str(job_id), "--to-state", "FAILED") == []

    follower = cli_server.popen("events", "--tag", "exp=events", "-f", "-o", "json", "--timeout", "120")
    text = _read_until(follower, str(job_id))  # the listing came out: the stream is open
    _move(cli_server, job_id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    text += _read_until(follower, '"JOB_FINISHED"')
    follower.terminate()
    follower.communicate(timeout=30)
    seen = [json.loads(line) for line in text.splitlines() if line.strip()]
    to_states = [e["jobState"]["toState"] for e in seen]
    assert to_states[-2:] == ["RUNNING", "JOB_FINISHED"]
    assert len({e["id"] for e in seen}) == len(seen)  # listing and stream overlap without repeats


def _read_until(process: subprocess.Popen[str], needle: str) -> str:
    """Lines of stdout up to and including the first containing `needle`. The command's
    own --timeout bounds the wait: at its end stdout closes."""
    collected = ""
    assert process.stdout is not None
    for line in process.stdout:
        collected += line
        if needle in line:
            return collected
    raise AssertionError(f"no line with {needle!r} in {collected!r}")


def test_job_watch_prints_transitions_as_they_happen(cli_server: CliServer, synced: None) -> None:
    job_id = _job(cli_server, "watch/0", "exp=watch")
    watcher = cli_server.popen("job", "watch", "--tag", "exp=watch", "--replay", "--timeout", "120")
    text = _read_until(watcher, "-> PREPROCESSED")  # replayed history: the stream is live from here
    _move(cli_server, job_id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_ERROR)
    text += _read_until(watcher, "-> FAILED")
    watcher.terminate()
    watcher.communicate(timeout=30)
    lines = text.splitlines()
    assert any(f"job {job_id}  PREPROCESSED -> RUNNING" in line for line in lines), lines
    # RUN_ERROR without a retry policy fails the job in the same step.
    assert any(f"job {job_id}  RUNNING -> FAILED" in line for line in lines), lines


def test_analytics_summarises_events(cli_server: CliServer, synced: None) -> None:
    ids = [_job(cli_server, f"an/{i}", "exp=analytics") for i in range(3)]
    for job_id in ids[:2]:
        _move(cli_server, job_id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    (summary,) = cli_server.json("analytics", "--tag", "exp=analytics", "--since", "1h")
    assert summary["jobs"] == 3
    assert summary["states"]["JOB_FINISHED"] == 2 and summary["states"]["RUNNING"] == 2
    assert summary["states"]["PREPROCESSED"] == 3
    assert sum(b["finished"] for b in summary["throughput"]) == 2
    assert summary["latency_seconds"]["run"]["count"] == 2
    table = cli_server.run("analytics", "--tag", "exp=analytics")
    assert table.returncode == 0 and "throughput" in table.stdout and "JOB_FINISHED" in table.stdout



def test_route_predicts_from_the_apps_history(cli_server: CliServer, synced: None) -> None:
    for i in range(2):
        _move(cli_server, _job(cli_server, f"route/{i}", "exp=route"), S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    (routed,) = cli_server.json("route", "--app", "Greeter", "--deadline", "3600")
    (mini,) = routed["sites"]
    assert mini["site"] == "mini" and mini["run_samples"] >= 2 and "run" not in mini["borrowed"]
    assert mini["total_s"] >= mini["run_s"] >= 0 and mini["meets_deadline"] is True
    assert mini["high_s"] >= mini["total_s"] and set(mini["spreads"]) == {"stage_in", "pilot_delay", "run", "stage_out"}
    assert routed["choices"]["earliest"] == "mini" and routed["choices"]["deadline"] == "mini"
    table = cli_server.run("route", "--app", "Greeter")
    assert table.returncode == 0 and "policies would choose" in table.stdout and "mini" in table.stdout
    missing = cli_server.run("route", "--app", "NoSuchApp")
    assert missing.returncode == 2 and "no app named 'NoSuchApp'" in missing.stderr

def test_route_calibrates_on_the_routed_jobs_that_finished(cli_server: CliServer, synced: None) -> None:
    # Jobs submitted with a router's prediction in their data (Decision.job_data) are the
    # record `balsamctl route` calibrates on: here predicted 100 s early at p90, so once
    # MIN_CALIBRATION of them have finished the margin is over 100 s.
    from balsam_grpc.sdk.routing import MIN_CALIBRATION, ROUTING_KEY

    (plain,) = cli_server.json("route", "--app", "Greeter")
    assert plain["calibration"]["margin_s"] is None and plain["sites"][0]["calibration_s"] == 0.0
    greeter = cli_server.client.apps.filter(name="Greeter").first()
    predicted = {ROUTING_KEY: {"site_id": greeter.site_id, "strategy": "deadline", "total_s": 0.0, "high_s": -100.0}}
    for i in range(MIN_CALIBRATION):
        job = greeter.submit(f"calib/{i}", who="x", tags={"exp": "calib"}, data=predicted)
        _move(cli_server, job.id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    (routed,) = cli_server.json("route", "--app", "Greeter")
    calibration, (mini,) = routed["calibration"], routed["sites"]
    assert calibration["finished_predictions"] == MIN_CALIBRATION and calibration["margin_s"] >= 100.0
    assert mini["calibration_s"] == calibration["margin_s"]
    assert mini["high_s"] == pytest.approx(mini["total_s"] + mini["spread_s"] + mini["calibration_s"])
    table = cli_server.run("route", "--app", "Greeter")
    assert table.returncode == 0 and "calibrated margin" in table.stdout


def test_login_with_password_and_token(cli_server: CliServer, tmp_path: Path) -> None:
    cli_server.call("AuthService", "CreateUser", auth_service_pb2.CreateUserRequest(
        username="bob", password="correct horse battery"))
    profile = tmp_path / "bob.json"
    env = {"BALSAM_PROFILE": str(profile)}
    result = cli_server.run("login", "--server", cli_server.address, "-u", "bob", "--password-stdin",
                            input="correct horse battery\n", env=env)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(profile).st_mode) == 0o600
    saved = json.loads(profile.read_text())
    assert saved["server"] == cli_server.address and saved["username"] == "bob" and saved["token"]
    who = cli_server.run("whoami", env=env)
    assert who.returncode == 0 and who.stdout.startswith("bob at ")
    mine = cli_server.run("job", "ls", "-o", "json", env=env)
    assert json.loads(mine.stdout) == []

    wrong = cli_server.run("login", "--server", cli_server.address, "-u", "bob", "--password-stdin",
                           input="wrong password\n", env={"BALSAM_PROFILE": str(tmp_path / "x.json")})
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ") and "UNAUTHENTICATED" in wrong.stderr
    assert not (tmp_path / "x.json").exists()

    other = tmp_path / "by-token.json"
    by_token = cli_server.run("login", "--server", cli_server.address, "--token", saved["token"],
                              env={"BALSAM_PROFILE": str(other)})
    assert by_token.returncode == 0 and "as bob" in by_token.stdout
    bad_token = cli_server.run("login", "--server", cli_server.address, "--token", "nonsense",
                               env={"BALSAM_PROFILE": str(tmp_path / "y.json")})
    assert bad_token.returncode == 1 and "UNAUTHENTICATED" in bad_token.stderr

    piped = tmp_path / "by-stdin.json"
    from_stdin = cli_server.run("login", "--server", cli_server.address, "--token-stdin",
                                input=saved["token"] + "\n", env={"BALSAM_PROFILE": str(piped)})
    assert from_stdin.returncode == 0 and "as bob" in from_stdin.stdout
    assert json.loads(piped.read_text())["token"] == saved["token"]
    empty = cli_server.run("login", "--server", cli_server.address, "--token-stdin", input="",
                           env={"BALSAM_PROFILE": str(tmp_path / "z.json")})
    assert empty.returncode == 2 and "stdin held no token" in empty.stderr
    assert not (tmp_path / "z.json").exists()


def test_unreachable_server_is_one_line_with_the_address_and_what_to_do(cli_server: CliServer) -> None:
    from tests.support.server_proc import free_port

    address = f"127.0.0.1:{free_port()}"
    for command in (["job", "ls"], ["site", "ls"], ["whoami"]):
        result = cli_server.run(*command, env={"BALSAM_SERVER": address}, timeout=120)
        assert result.returncode == 1
        line = one_error_line(result)
        assert f"no balsam server answers at {address}" in line and "balsamctl server start" in line, line


@pytest.mark.parametrize("command", [
    ["login"], ["whoami"], ["app", "ls"], ["app", "sync"], ["app", "rm"], ["job", "create"], ["job", "ls"],
    ["job", "show"], ["job", "modify"], ["job", "rm"], ["job", "history"], ["job", "wait"], ["job", "watch"],
    ["queue", "submit"], ["queue", "ls"], ["queue", "rm"], ["events"], ["analytics"],
])
def test_every_command_has_help_with_an_example(cli_server: CliServer, command: list[str]) -> None:
    result = cli_server.run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "balsamctl " + " ".join(command) in result.stdout.replace("\n", " ")  # an example line


def test_no_color_and_plain_output_when_piped(cli_server: CliServer, synced: None) -> None:
    result = cli_server.run("job", "ls", "--by-state", env={"NO_COLOR": "1"})
    assert result.returncode == 0 and "\x1b[" not in result.stdout
    colored = cli_server.run("job", "ls", "--by-state", env={"FORCE_COLOR": "1", "NO_COLOR": ""})
    assert colored.returncode == 0
