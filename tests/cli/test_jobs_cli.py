"""balsamctl as a user runs it: a subprocess against a real server process.

Jobs are created from a JSON-lines file, listed as tables and JSON, filtered, counted
per state, modified by tag, deleted with confirmation, waited for and their history
shown; bad input is refused with one line on stderr before anything is created.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from balsam_grpc.v1 import app_pb2, app_service_pb2, job_pb2, job_service_pb2, site_pb2, site_service_pb2
from tests.cli.conftest import CliServer, one_error_line

N_FILE_JOBS = 3000
S = job_pb2


@pytest.fixture(scope="module")
def world(cli_server: CliServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A site with two apps, and 3000 jobs created by `balsamctl job create --file`."""
    site = cli_server.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name="laptop", hostname="localhost", path=str(cli_server.home / "site")))).site
    hello = app_pb2.App(site_id=site.id, name="hello", command_template="echo {{ n }} {{ label }}", parameters=[
        app_pb2.AppParameter(name="n", required=True, type=app_pb2.PARAMETER_TYPE_INT, help="how many"),
        app_pb2.AppParameter(name="label", default_value="x")])
    hello = cli_server.call("AppService", "CreateApp", app_service_pb2.CreateAppRequest(app=hello)).app
    other = cli_server.call("AppService", "CreateApp", app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=site.id, name="other", command_template="true"))).app
    path = tmp_path_factory.mktemp("input") / "jobs.jsonl"
    lines = [json.dumps({"app": "hello", "workdir": f"bulk/{i}", "parameters": {"n": i},
                         "tags": {"parity": "even" if i % 2 == 0 else "odd"}}) for i in range(N_FILE_JOBS)]
    path.write_text("# a comment line\n" + "\n".join(lines) + "\n")
    result = cli_server.run("job", "create", "--file", str(path), "--site", "laptop", "--tag", "exp=bulk",
                            "--chunk-size", "700")
    assert result.returncode == 0, result.stderr
    assert f"created {N_FILE_JOBS} jobs" in result.stdout
    return {"site": site, "hello": hello, "other": other, "file": path}


def count(cli_server: CliServer, **filters: Any) -> int:
    flt = job_pb2.JobFilter(**filters)
    return int(cli_server.call("JobService", "CountJobs", job_service_pb2.CountJobsRequest(filter=flt)).total)


def create(cli_server: CliServer, workdir: str, tags: dict[str, str], app: str = "hello") -> int:
    args = ["job", "create", "--app", app, "--site", "laptop", "-w", workdir, "-o", "json"]
    if app == "hello":
        args += ["-p", "n=1"]
    for k, v in tags.items():
        args += ["--tag", f"{k}={v}"]
    result = cli_server.run(*args)
    assert result.returncode == 0, result.stderr
    (job,) = json.loads(result.stdout)
    return int(job["id"])


def move(cli_server: CliServer, job_id: int, *states: int) -> None:
    """Kill a job as its owner, or run it as a launcher would: lease it (RUNNING) and
    report the rest."""
    if states == (S.JOB_STATE_KILLED,):
        cli_server.call("JobService", "UpdateJob", job_service_pb2.UpdateJobRequest(
            job=job_pb2.Job(id=job_id, state=S.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))
        return
    assert states[0] == S.JOB_STATE_RUNNING
    cli_server.run_job(job_id, *states[1:])


# ------------------------------------------------------------------ create and list

def test_file_jobs_listed_as_json_with_their_fields(cli_server: CliServer, world: dict[str, Any]) -> None:
    jobs = cli_server.json("job", "ls", "--tag", "exp=bulk")
    assert len(jobs) == N_FILE_JOBS
    by_workdir = {j["workdir"]: j for j in jobs}
    sample = by_workdir["bulk/1234"]
    assert sample["parameters"] == {"n": "1234", "label": "x"}  # the default filled in
    assert sample["tags"] == {"exp": "bulk", "parity": "even"}
    assert sample["appId"] == world["hello"].id
    # No transfers or hooks: the server moved every job on to PREPROCESSED.
    assert {j["state"] for j in jobs} == {"PREPROCESSED"}
    assert [int(j["id"]) for j in jobs] == sorted(int(j["id"]) for j in jobs)


def test_json_and_table_speak_one_vocabulary(cli_server: CliServer, world: dict[str, Any]) -> None:
    """Ids are JSON numbers and states bare names, as in the table: a jq filter written
    from what the table shows matches."""
    listed = cli_server.json("job", "ls", "--tag", "exp=bulk", "--limit", "3")
    assert all(type(j["id"]) is int and type(j["appId"]) is int and type(j["siteId"]) is int for j in listed)
    assert {j["state"] for j in listed} == {"PREPROCESSED"}
    table = cli_server.run("job", "ls", "--id", str(listed[0]["id"]), "--no-header")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:2] == [str(listed[0]["id"]), listed[0]["state"]]
    yaml_text = cli_server.run("job", "ls", "--id", str(listed[0]["id"]), "-o", "yaml").stdout
    assert f"id: {listed[0]['id']}\n" in yaml_text and "state: PREPROCESSED" in yaml_text
    # Every field is there, zero values too: `jq 'select(.priority == 0)'` or `.parentIds == []` match.
    fields = {f.json_name for f in job_pb2.Job.DESCRIPTOR.fields
              if f.containing_oneof is None or f.containing_oneof.name.startswith("_")}
    assert fields <= set(listed[0]), sorted(fields - set(listed[0]))
    assert listed[0]["priority"] == 0 and listed[0]["parentIds"] == [] and listed[0]["returnCode"] is None


def test_table_output_has_header_rows_and_names(cli_server: CliServer, world: dict[str, Any]) -> None:
    result = cli_server.run("job", "ls", "--tag", "exp=bulk", "--limit", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:6] == ["ID", "STATE", "APP", "SITE", "WORKDIR", "TAGS"]
    assert len(lines) == 6
    assert all("PREPROCESSED" in line and "hello" in line and "laptop" in line for line in lines[1:])
    bare = cli_server.run("job", "ls", "--tag", "exp=bulk", "--limit", "5", "--no-header")
    assert [row.split() for row in bare.stdout.strip().splitlines()] == [row.split() for row in lines[1:]]
    wide = cli_server.run("job", "ls", "--tag", "exp=bulk", "--limit", "1", "-o", "wide")
    assert "NODES" in wide.stdout.splitlines()[0] and "NODES" not in lines[0]


def test_yaml_output_is_the_same_data(cli_server: CliServer, world: dict[str, Any]) -> None:
    import yaml

    as_json = cli_server.json("job", "ls", "--tag", "parity=odd", "--limit", "3")
    result = cli_server.run("job", "ls", "--tag", "parity=odd", "--limit", "3", "-o", "yaml")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == as_json


def test_filters_by_tag_state_app_id_and_limit(cli_server: CliServer, world: dict[str, Any]) -> None:
    assert len(cli_server.json("job", "ls", "--tag", "exp=bulk", "--tag", "parity=even")) == N_FILE_JOBS // 2
    assert cli_server.json("job", "ls", "--tag", "exp=bulk", "--state", "FAILED,KILLED") == []
    assert len(cli_server.json("job", "ls", "--tag", "exp=bulk", "--state", "preprocessed", "-n", "10")) == 10
    assert cli_server.json("job", "ls", "--tag", "exp=bulk", "--exclude-state", "PREPROCESSED") == []
    assert cli_server.json("job", "ls", "--tag", "exp=bulk", "--app", "other") == []
    assert len(cli_server.json("job", "ls", "--tag", "exp=bulk", "--app", "hello", "--site", "laptop",
                               "--since", "1h", "-n", "7")) == 7
    some = cli_server.json("job", "ls", "--tag", "exp=bulk", "-n", "3")
    ids = [str(j["id"]) for j in some]
    picked = cli_server.json("job", "ls", "--id", ",".join(ids[:2]), "--id", ids[2])
    assert [str(j["id"]) for j in picked] == ids


def test_by_state_summary_uses_server_counts(cli_server: CliServer, world: dict[str, Any]) -> None:
    killed = create(cli_server, "summary/k", {"exp": "summary"})
    create(cli_server, "summary/p", {"exp": "summary"})
    move(cli_server, killed, S.JOB_STATE_KILLED)
    result = cli_server.run("job", "ls", "--tag", "exp=summary", "--by-state")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["STATE", "COUNT"]
    assert sorted(rows[1:3]) == [["KILLED", "1"], ["PREPROCESSED", "1"]]
    assert rows[-1] == ["total", "2"]
    (doc,) = cli_server.json("job", "ls", "--tag", "exp=bulk", "--by-state", "--by-site")
    assert doc["total"] == N_FILE_JOBS
    assert doc["groups"] == [{"state": "PREPROCESSED", "siteId": world["site"].id,
                              "count": N_FILE_JOBS}]


# ------------------------------------------------------------------ bulk changes

def test_modify_by_tag_with_yes(cli_server: CliServer, world: dict[str, Any]) -> None:
    result = cli_server.run("job", "modify", "--tag", "parity=odd", "--tag", "exp=bulk", "--set-tag", "seen=yes",
                            "--set-priority", "3", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"modified {N_FILE_JOBS // 2} jobs" in result.stdout
    seen = cli_server.json("job", "ls", "--tag", "seen=yes")
    assert len(seen) == N_FILE_JOBS // 2
    assert all(j["tags"]["parity"] == "odd" and j["priority"] == 3 for j in seen)


def test_modify_refuses_without_a_terminal_or_yes(cli_server: CliServer, world: dict[str, Any]) -> None:
    before = count(cli_server, states=[S.JOB_STATE_KILLED], tags={"exp": "bulk"})
    result = cli_server.run("job", "modify", "--tag", "exp=bulk", "--set-state", "KILLED", stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "refusing to modify 3000 jobs" in one_error_line(result)
    assert count(cli_server, states=[S.JOB_STATE_KILLED], tags={"exp": "bulk"}) == before == 0


def test_modify_dry_run_previews_and_changes_nothing(cli_server: CliServer, world: dict[str, Any]) -> None:
    result = cli_server.run("job", "modify", "--tag", "parity=even", "--set-state", "KILLED", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would modify {N_FILE_JOBS // 2} jobs (state=KILLED)" in result.stdout
    assert count(cli_server, states=[S.JOB_STATE_KILLED], tags={"exp": "bulk"}) == 0


def test_modify_all_selects_every_job_explicitly(cli_server: CliServer, world: dict[str, Any]) -> None:
    # The server refuses an empty BatchUpdateJobs filter; --all must still reach every job.
    refused = cli_server.run("job", "modify", "--set-tag", "everyone=yes", "--dry-run")
    assert refused.returncode != 0 and "pass --all" in refused.stderr
    result = cli_server.run("job", "modify", "--all", "--set-tag", "everyone=yes", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would modify {count(cli_server)} jobs (tags=" in result.stdout


def test_modify_reports_each_refused_job_and_fails(cli_server: CliServer, world: dict[str, Any]) -> None:
    done = create(cli_server, "refuse/final", {"exp": "refuse"})
    live = create(cli_server, "refuse/live", {"exp": "refuse"})
    move(cli_server, done, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_ERROR)  # no retry policy: FAILED
    result = cli_server.run("job", "modify", "--tag", "exp=refuse", "--set-state", "KILLED", "--yes")
    assert result.returncode == 1
    assert "modified 1 jobs" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: job {done}: cannot move a job from FAILED to KILLED")
    assert errors[0].endswith("(ILLEGAL_TRANSITION)")
    assert count(cli_server, ids=[live], states=[S.JOB_STATE_KILLED]) == 1


def test_delete_with_confirmation(cli_server: CliServer, world: dict[str, Any]) -> None:
    ids = [create(cli_server, f"del/{i}", {"exp": "delete"}) for i in range(3)]
    refused = cli_server.run("job", "rm", "--tag", "exp=delete", stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "refusing to delete 3 jobs" in one_error_line(refused)
    dry = cli_server.run("job", "rm", "--tag", "exp=delete", "--dry-run")
    assert dry.returncode == 0 and "would delete 3 jobs" in dry.stdout
    assert count(cli_server, ids=ids) == 3

    # Answered at a terminal: "n" keeps the jobs, "y" deletes them.
    assert _at_terminal(cli_server, ["job", "rm", "--tag", "exp=delete"], "n\n") == 1
    assert count(cli_server, ids=ids) == 3
    assert _at_terminal(cli_server, ["job", "rm", "--tag", "exp=delete"], "y\n") == 0
    assert count(cli_server, ids=ids) == 0


def _at_terminal(cli_server: CliServer, args: list[str], answer: str) -> int:
    """Run with stdin on a pseudo-terminal and type `answer` at the prompt."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([*_cmd(cli_server), *args], stdin=slave, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=cli_server.env)
        os.write(master, answer.encode())
        process.communicate(timeout=60)
        return process.returncode
    finally:
        os.close(master)
        os.close(slave)


def _cmd(cli_server: CliServer) -> list[str]:
    from tests.cli.conftest import BALSAMCTL

    return [BALSAMCTL]


def test_rm_without_filter_is_refused(cli_server: CliServer, world: dict[str, Any]) -> None:
    result = cli_server.run("job", "rm", "--yes")
    assert result.returncode == 2
    assert "no filter given" in one_error_line(result)
    assert count(cli_server, tags={"exp": "bulk"}) == N_FILE_JOBS


# ------------------------------------------------------------------ wait and history

def test_wait_exits_0_when_all_finish(cli_server: CliServer, world: dict[str, Any]) -> None:
    ids = [create(cli_server, f"wait-ok/{i}", {"exp": "wait-ok"}) for i in range(2)]
    waiter = cli_server.popen("job", "wait", "--tag", "exp=wait-ok", "--timeout", "60")
    for job_id in ids:
        move(cli_server, job_id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)  # the server finishes it
    stdout, stderr = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, stderr
    assert "2 jobs: 2 JOB_FINISHED" in stdout


def test_wait_exits_1_when_any_fails(cli_server: CliServer, world: dict[str, Any]) -> None:
    good = create(cli_server, "wait-bad/ok", {"exp": "wait-bad"})
    bad = create(cli_server, "wait-bad/fail", {"exp": "wait-bad"})
    waiter = cli_server.popen("job", "wait", "--tag", "exp=wait-bad", "--timeout", "60")
    move(cli_server, good, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    move(cli_server, bad, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_ERROR)  # no retry on error: FAILED
    stdout, stderr = waiter.communicate(timeout=90)
    assert waiter.returncode == 1, stderr
    assert "1 FAILED" in stdout and "1 JOB_FINISHED" in stdout
    assert f"did not finish: {bad}" in stderr


def test_wait_exits_2_on_timeout(cli_server: CliServer, world: dict[str, Any]) -> None:
    create(cli_server, "wait-slow/0", {"exp": "wait-slow"})
    result = cli_server.run("job", "wait", "--tag", "exp=wait-slow", "--timeout", "1")
    assert result.returncode == 2
    assert "timed out after 1 s: 1 of 1 jobs not final" in one_error_line(result)


def test_wait_with_nothing_selected_fails(cli_server: CliServer, world: dict[str, Any]) -> None:
    """A wait that selects nothing (a typo in a tag) must not let `wait && next-step` go on."""
    result = cli_server.run("job", "wait", "--tag", "exp=no-such-experiment", "--timeout", "30")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no jobs match --tag exp=no-such-experiment: nothing to wait for" in one_error_line(result)


def test_history_shows_each_transition(cli_server: CliServer, world: dict[str, Any]) -> None:
    job_id = create(cli_server, "history/0", {"exp": "history"})
    move(cli_server, job_id, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    events = cli_server.json("job", "history", str(job_id))
    moves = [(e["jobState"].get("fromState", "UNSPECIFIED"), e["jobState"]["toState"]) for e in events]
    assert moves[-2][1] == "RUNNING" and moves[-1][1] == "JOB_FINISHED"
    assert any(e.get("message", "").startswith("leased to session") for e in events)
    table = cli_server.run("job", "history", str(job_id))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["TIME", "FROM", "TO", "MESSAGE", "DATA"]
    assert any("PREPROCESSED" in line and "RUNNING" in line for line in table.stdout.splitlines())
    missing = cli_server.run("job", "history", "99999999")
    assert missing.returncode == 1 and "(NOT_FOUND)" in one_error_line(missing)


def test_history_and_show_print_whole_numbers_as_integers(cli_server: CliServer, world: dict[str, Any]) -> None:
    """A Struct holds every number as a double: the return code 3 the server records in
    the event of a failed run showed as "return_code": 3.0 in `job history` (table and
    JSON), and a job's data {"n": 5} as 5.0 in `job show` and in the SDK's Job.data."""
    from tests.support.launcher import client_run_job

    result = cli_server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", "history/rc", "-p", "n=1",
                            "--data", '{"n": 5, "x": 2.5, "nested": [1, {"k": 7}]}', "-o", "json")
    assert result.returncode == 0, result.stderr
    job_id = int(json.loads(result.stdout)[0]["id"])
    client_run_job(cli_server.client, job_id, S.JOB_STATE_RUN_ERROR, return_code=3)
    table = cli_server.run("job", "history", str(job_id))
    assert table.returncode == 0, table.stderr
    assert re.search(r'"return_code": 3[,}]', " ".join(table.stdout.split())) and "3.0" not in table.stdout
    events = cli_server.json("job", "history", str(job_id))
    (failed,) = [e for e in events if "return_code" in (e.get("data") or {})]
    assert type(failed["data"]["return_code"]) is int
    wide = cli_server.run("events", "--job", str(job_id), "-o", "wide")
    assert re.search(r'"return_code": 3[,}]', " ".join(wide.stdout.split())) and "3.0" not in wide.stdout
    (shown,) = cli_server.json("job", "show", str(job_id))
    assert shown["data"] == {"n": 5, "x": 2.5, "nested": [1, {"k": 7}]} and type(shown["data"]["n"]) is int
    data = cli_server.client.jobs.get(id=job_id).data
    assert data == {"n": 5, "x": 2.5, "nested": [1, {"k": 7}]} and type(data["n"]) is int
    assert type(data["nested"][1]["k"]) is int


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("args", "expected"), [
    (["job", "ls", "--state", "RUNNNING"], "unknown job state 'RUNNNING'; valid states: CREATED,"),
    (["job", "modify", "--state", "DONE", "--set-state", "KILLED", "--yes"], "unknown job state 'DONE'"),
    (["job", "create", "--app", "hello", "--site", "laptop", "-w", "bad/0", "-p", "n=1", "--tag", "foo"],
     "tag 'foo' must look like key=value"),
    (["job", "ls", "--tag", "exp"], "tag 'exp' must look like key=value"),
    (["job", "create", "--app", "hello", "--site", "laptop", "-w", "bad/1"],
     "parameters.n: app 'hello' requires parameter 'n' (how many) (INVALID_FIELD)"),
    (["job", "create", "--app", "hello", "--site", "laptop", "-w", "bad/2", "-p", "n=x"],
     "parameters.n: 'x' is not a valid int (INVALID_FIELD)"),
    (["job", "create", "--app", "hello", "--site", "laptop", "-w", "bad/3", "-p", "n=1", "-p", "colour=red"],
     "parameters.colour: app 'hello' has no parameter 'colour'"),
    (["job", "create", "--app", "nope", "--site", "laptop", "-w", "bad/4"], "no app 'nope' at site 'laptop'"),
    # Unknown apps and sites in filters and options: a usage error, whatever the command
    # (job ls --app Nope printed an empty table and exited 0; queue submit --site nope
    # exited 1 where job create exited 2).
    (["job", "ls", "--app", "Nope"], "no app 'Nope' (see `balsamctl app ls`)"),
    (["job", "ls", "--app", "hello", "--app", "Nope"], "no app 'Nope'"),
    (["job", "ls", "--app", "999999"], "no app 999999"),
    (["job", "ls", "--app", "Nope", "-o", "json"], "no app 'Nope'"),
    (["job", "modify", "--app", "Nope", "--set-priority", "3", "--yes"], "no app 'Nope'"),
    (["job", "watch", "--app", "Nope", "--timeout", "1"], "no app 'Nope'"),
    (["job", "wait", "--app", "Nope", "--timeout", "1"], "no app 'Nope'"),
    (["job", "ls", "--site", "nope"], "no site 'nope'; your sites: "),
    (["job", "create", "--app", "hello", "--site", "nope", "-w", "bad/5", "-p", "n=1"], "no site 'nope'"),
    (["queue", "submit", "--site", "nope", "-n", "1", "-t", "5"], "no site 'nope'"),
    (["queue", "ls", "--site", "nope"], "no site 'nope'"),
    # A negative timeout was taken (job wait gave up at once, "timed out after -1 s").
    (["job", "wait", "--tag", "exp=bulk", "--timeout", "-1"], "--timeout must be a number of seconds, 0 or more, "
                                                              "got -1"),
    (["job", "wait", "--tag", "exp=bulk", "--timeout", "nan"], "--timeout must be a number of seconds"),
    (["job", "watch", "--timeout", "-0.5"], "--timeout must be a number of seconds, 0 or more, got -0.5"),
    (["events", "--follow", "--timeout", "-1"], "--timeout must be a number of seconds"),
    (["job", "ls", "--since", "yesterday"], "--since: 'yesterday' is neither an ISO time"),
    (["job", "ls", "--limit", "ten"], "Invalid value for '--limit'"),  # typer's own checks: one line too
    (["queue", "submit", "--site", "laptop", "-t", "5"], "Missing option '--num-nodes'"),
])
def test_bad_input_is_one_line_and_nothing_is_created(cli_server: CliServer, world: dict[str, Any],
                                                      args: list[str], expected: str) -> None:
    before = count(cli_server)
    result = cli_server.run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in one_error_line(result)
    assert result.stdout == ""
    assert count(cli_server) == before


def test_bad_line_in_a_file_names_the_line(cli_server: CliServer, world: dict[str, Any], tmp_path: Path) -> None:
    lines = [json.dumps({"app": "hello", "workdir": f"badfile/{i}", "parameters": {"n": i}}) for i in range(40)]
    lines[16] = json.dumps({"app": "hello", "workdir": "badfile/16", "parameters": {"n": "sixteen"}})
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines))
    before = count(cli_server)
    result = cli_server.run("job", "create", "--file", str(path), "--site", "laptop")
    assert result.returncode == 2
    assert f"{path}:17: parameters.n: 'sixteen' is not a valid int (INVALID_FIELD)" in one_error_line(result)
    lines[16] = json.dumps({"app": "hello", "workdir": "badfile/3", "parameters": {"n": 1}})
    path.write_text("\n".join(lines))
    duplicate = cli_server.run("job", "create", "--file", str(path), "--site", "laptop")
    assert duplicate.returncode == 2
    assert f"{path}:17: workdir 'badfile/3' is also used by {path}:4" in one_error_line(duplicate)
    assert count(cli_server) == before


def test_server_refusal_is_one_line_with_reason(cli_server: CliServer, world: dict[str, Any]) -> None:
    result = cli_server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", "bulk/7", "-p", "n=1")
    assert result.returncode == 1
    assert one_error_line(result).endswith("(ALREADY_EXISTS); nothing created")


def test_show_json_and_fields(cli_server: CliServer, world: dict[str, Any]) -> None:
    job_id = create(cli_server, "show/0", {"exp": "show"})
    (job,) = cli_server.json("job", "show", str(job_id))
    assert job["workdir"] == "show/0" and job["parameters"] == {"n": "1", "label": "x"}
    table = cli_server.run("job", "show", str(job_id))
    assert table.returncode == 0, table.stderr
    fields = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines() if line.strip()}
    assert fields["state"] == ["PREPROCESSED"] and fields["app"][0] == "hello"


def test_show_names_the_app_once_and_not_empty(cli_server: CliServer, world: dict[str, Any]) -> None:
    """`job show` printed an empty appName next to `app hello (1)`: the server answers
    with app_id only (app_name selects the app on create), and show listed every field.
    The table shows the app and the site once each, by name and id; JSON and YAML carry
    the app's name in appName."""
    job_id = create(cli_server, "show/1", {"exp": "show"})
    app_id, site_id = world["hello"].id, world["hello"].site_id
    (job,) = cli_server.json("job", "show", str(job_id))
    assert job["appName"] == "hello" and job["appId"] == app_id and job["siteId"] == site_id
    yaml_text = cli_server.run("job", "show", str(job_id), "-o", "yaml").stdout
    assert "appName: hello" in yaml_text
    table = cli_server.run("job", "show", str(job_id))
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines() if line.strip()]
    names = [row[0] for row in rows]
    assert "appName" not in names and "appId" not in names and "siteId" not in names
    assert names.count("app") == 1 and names.count("site") == 1 and names[1:3] == ["app", "site"]
    by_name = {row[0]: row[1:] for row in rows}
    assert by_name["app"] == ["hello", f"({app_id})"] and by_name["site"] == ["laptop", f"({site_id})"]
    assert all(len(row) > 1 or row[0] in ("name", "stateMessage", "errorTail") for row in rows), rows


def test_retry_finishes_a_failed_dag(cli_server: CliServer, world: dict[str, Any]) -> None:
    """One parent, three children: the parent's run fails and fails its children; `job
    retry` of the whole selection restarts the parent and sets the children waiting, and
    the DAG then finishes."""
    parent = create(cli_server, "dag/parent", {"exp": "dag"})
    children = [int(cli_server.call("JobService", "CreateJob", job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=world["hello"].id, workdir=f"dag/child{i}", parameters={"n": "1"}, parent_ids=[parent],
        tags={"exp": "dag"}))).job.id) for i in range(3)]
    move(cli_server, parent, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_ERROR)  # no retry policy: FAILED
    assert count(cli_server, tags={"exp": "dag"}, states=[S.JOB_STATE_FAILED]) == 4

    dry = cli_server.run("job", "retry", "--tag", "exp=dag", "--dry-run")
    assert dry.returncode == 0 and "would retry 4 jobs" in dry.stdout, dry.stdout + dry.stderr
    done = cli_server.run("job", "retry", "--tag", "exp=dag", "--yes")
    assert done.returncode == 0 and "retried 4 jobs" in done.stdout, done.stdout + done.stderr
    assert count(cli_server, ids=[parent], states=[S.JOB_STATE_RESTART_READY]) == 1
    assert count(cli_server, ids=children, states=[S.JOB_STATE_AWAITING_PARENTS]) == 3

    move(cli_server, parent, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    for child in children:
        move(cli_server, child, S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE)
    assert count(cli_server, tags={"exp": "dag"}, states=[S.JOB_STATE_JOB_FINISHED]) == 4
    again = cli_server.run("job", "retry", "--tag", "exp=dag", "--yes")
    assert again.returncode == 1 and "NOT_RETRYABLE" in again.stderr
