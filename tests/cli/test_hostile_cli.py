"""balsamctl given what a careless or hostile user, script or job process may store or
type: values that look like rich markup or terminal control sequences, and numbers
no id or count can be. Each ends as readable output or one error line, never a
traceback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from balsam_grpc.v1 import app_pb2, app_service_pb2, site_pb2, site_service_pb2
from tests.cli.conftest import CliServer, one_error_line


@pytest.fixture(scope="module")
def world(sqlite_cli_server: CliServer) -> dict[str, Any]:
    server = sqlite_cli_server
    site = server.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name="laptop", hostname="localhost", path=str(server.home / "site")))).site
    app = server.call("AppService", "CreateApp", app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=site.id, name="hello", command_template="echo {{ who }}",
                        parameters=[app_pb2.AppParameter(name="who", default_value="x")]))).app
    return {"site": site, "app": app}


def test_markup_and_control_characters_are_shown_as_text(sqlite_cli_server: CliServer,
                                                        world: dict[str, Any]) -> None:
    """rich parsed table cells as markup: a workdir with "[/]" made `job create` print a
    MarkupError traceback after creating the job, and every later `job ls` showing it
    crashed the same way; "[link=...]" in a tag became a hidden hyperlink and ESC reached
    the terminal raw."""
    server = sqlite_cli_server
    created = server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", "markup/[/]x",
                         "-t", "exp=hostile", "-t", "v=[link=http://evil.example]click")
    assert created.returncode == 0, created.stderr
    assert "markup/[/]x" in created.stdout and "v=[link=http://evil.example]click" in created.stdout
    created = server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", "markup/[bold]y:smile:",
                         "-t", "exp=hostile", "-t", "esc=a\x1b[2Jb\u202ec")
    assert created.returncode == 0, created.stderr

    listed = server.run("job", "ls", "--tag", "exp=hostile", "-o", "wide")
    assert listed.returncode == 0, listed.stderr
    assert "markup/[/]x" in listed.stdout and "markup/[bold]y:smile:" in listed.stdout
    assert "esc=a\\x1b[2Jb\\u202ec" in listed.stdout
    assert "\x1b" not in listed.stdout and "\u202e" not in listed.stdout
    # The stored values are unchanged: JSON shows them as they are.
    tags = [job["tags"] for job in json.loads(server.run("job", "ls", "--tag", "exp=hostile", "-o", "json").stdout)]
    assert {"exp": "hostile", "esc": "a\x1b[2Jb\u202ec"} in tags


@pytest.mark.parametrize(("args", "code", "expected"), [
    (["token", "create", "--site", "²"], 2, "no site '²'"),
    (["route", "--app", "hello", "--site", "²"], 2, "no site '²'"),
    (["transfers", "ls", "--job", "²"], 2, "--job: '²' is not a job id"),
    (["job", "create", "--app", "²", "--site", "laptop", "-w", "digits/1"], 2, "no app '²'"),
])
def test_non_ascii_digits_are_names_not_ids(sqlite_cli_server: CliServer, world: dict[str, Any],
                                            args: list[str], code: int, expected: str) -> None:
    """"²".isdigit() is true and int("²") raises: these commands took "²" for an id and
    ended in a ValueError traceback."""
    result = sqlite_cli_server.run(*args)
    assert result.returncode == code, result.stderr
    assert expected in one_error_line(result)


def test_non_ascii_digits_in_a_job_file(sqlite_cli_server: CliServer, world: dict[str, Any], tmp_path: Any) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"app": "hello", "site": "²", "workdir": "digits/2"}) + "\n")
    result = sqlite_cli_server.run("job", "create", "--file", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}:1: no site '²'" in one_error_line(result)


@pytest.mark.parametrize(("args", "option"), [
    (["job", "show", "99999999999999999999"], "job_ids"),
    (["job", "history", "99999999999999999999"], "job_id"),
    (["job", "modify", "--state", "FAILED", "--set-priority", "99999999999", "--yes"], "--set-priority"),
    (["queue", "submit", "--site", "laptop", "-n", "99999999999", "-t", "10"], "--num-nodes"),
    (["queue", "submit", "--site", "laptop", "-n", "1", "-t", "99999999999"], "--wall-time-min"),
    (["queue", "rm", "99999999999999999999", "--yes"], "ids"),
])
def test_numbers_beyond_the_wire_types_are_usage_errors(sqlite_cli_server: CliServer, world: dict[str, Any],
                                                         args: list[str], option: str) -> None:
    """Ids are int64 and priorities, nodes and minutes int32 on the wire: a larger number
    was accepted by typer and refused by protobuf, a "ValueError: Value out of range"
    traceback with exit 1."""
    result = sqlite_cli_server.run(*args)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{option}'" in one_error_line(result)


@pytest.mark.parametrize("command", ["analytics", "results"])
def test_plots_folder_that_cannot_be_made_is_one_line(sqlite_cli_server: CliServer, world: dict[str, Any],
                                                      tmp_path: Any, command: str) -> None:
    """`--plots` naming a file, or a folder under one, ended in a FileExistsError or
    NotADirectoryError traceback after the events or results were read."""
    from tests.cli.test_results_cli import result as results_file

    server = sqlite_cli_server
    if command == "analytics":
        created = server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", "plots/1")
        assert created.returncode == 0, created.stderr  # an event to plot
        args = ["analytics", "--since", "1d"]
    else:
        path = tmp_path / "ds-1.json"
        path.write_text(json.dumps(results_file(2e-12, 2e-12)))
        args = ["results", str(path)]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = server.run(*args, "--plots", str(a_file))
    assert result.returncode == 2, result.stderr
    assert f"--plots: {a_file} exists and is not a folder" in one_error_line(result)
    result = server.run(*args, "--plots", str(a_file / "plots"))
    assert result.returncode == 2, result.stderr
    assert f"--plots: cannot create the folder {a_file / 'plots'}" in one_error_line(result)


def test_app_sync_of_a_file_says_it_is_not_a_folder(sqlite_cli_server: CliServer, world: dict[str, Any],
                                                    tmp_path: Any) -> None:
    """`app sync --folder apps.py` said the folder "does not exist here" while it does,
    as a file."""
    apps_file = tmp_path / "apps.py"
    apps_file.write_text("")
    result = sqlite_cli_server.run("app", "sync", "--site", "laptop", "--folder", str(apps_file))
    assert result.returncode == 2, result.stderr
    assert f"apps folder {apps_file} is a file, not a folder" in one_error_line(result)


def stored_before_the_rule(server: CliServer, table: str, row_id: int, column: str, value: str) -> None:
    """Write `value` into a row as a server that accepted control characters in names
    did (existing data is not migrated), straight into the SQLite database."""
    import sqlite3

    with sqlite3.connect(server.server.database_url.removeprefix("sqlite:///")) as db:
        db.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (value, row_id))
    db.close()


def test_site_ls_shows_bidi_and_c1_characters_escaped(sqlite_cli_server: CliServer, world: dict[str, Any]) -> None:
    """`site ls` printed its own columns, not a table: a site name with U+202E (right-to-
    left override) reversed the rest of its line on screen, and U+009B is a terminal's
    one-byte CSI. (The server now refuses such names; one stored before still shows.)"""
    server = sqlite_cli_server
    site = server.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name="bidi-to-be", hostname="localhost", path=str(server.home / "bidi")))).site
    stored_before_the_rule(server, "sites", site.id, "name", "ab\u202ecd\u009b")
    result = server.run("site", "ls")
    assert result.returncode == 0, result.stderr
    assert "ab\\u202ecd\\x9b" in result.stdout
    assert "\u202e" not in result.stdout and "\u009b" not in result.stdout


@pytest.mark.parametrize(("name", "named"), [("ab\u202ecd", "\\u202e (a bidirectional control)"),
                                             ("x\u009by", "\\u009b (a C1 control)"), ("a\x7fb", "\\u007f (DEL)")])
def test_site_init_refuses_a_name_with_control_characters(sqlite_cli_server: CliServer, world: dict[str, Any],
                                                          tmp_path: Any, name: str, named: str) -> None:
    """The server took DEL, C1 and bidirectional controls in a site name (it refused only
    characters below 32): `site init --name 'ab<U+202E>cd'` made a site whose name turned
    every later listing around. Now one error line naming the character, nothing made."""
    server = sqlite_cli_server
    result = server.run("site", "init", str(tmp_path / "s"), "--name", name)
    assert result.returncode != 0
    line = one_error_line(result)
    assert "site.name" in line and named in line and "remove it" in line
    assert not (tmp_path / "s" / "settings.yml").exists()
    assert all(s.name != name for s in server.client.call(
        "SiteService", "ListSites", site_service_pb2.ListSitesRequest()).sites)


@pytest.mark.parametrize(("workdir", "named"), [("runs/a\nb", "\\u000a (a newline)"), ("runs/\x1b[2J", "\\u001b (ESC)"),
                                                ("runs/ab\u202ecd", "\\u202e (a bidirectional control)")])
def test_job_create_refuses_a_workdir_with_control_characters(sqlite_cli_server: CliServer, world: dict[str, Any],
                                                              workdir: str, named: str) -> None:
    """A workdir with a newline, ESC or U+202E was created (only NUL was refused), and
    every tool printing paths showed it raw. Refused before sending (exit 2), with the
    server's words."""
    result = sqlite_cli_server.run("job", "create", "--app", "hello", "--site", "laptop", "-w", workdir)
    assert result.returncode == 2, result.stderr
    assert f"workdir \"{workdir[:5]}" in one_error_line(result) and named in one_error_line(result)


def test_site_init_refuses_an_all_digit_name(sqlite_cli_server: CliServer, world: dict[str, Any],
                                             tmp_path: Any) -> None:
    """`site init ./x --name 1` was accepted, and afterwards `--site 1` always meant the
    site with id 1: the site could not be named. Refused, saying why."""
    result = sqlite_cli_server.run("site", "init", str(tmp_path / "x"), "--name", "1")
    assert result.returncode != 0
    line = one_error_line(result)
    assert "site.name '1' is all digits, which balsamctl reads as an id" in line and "add a letter" in line
    assert not (tmp_path / "x" / "settings.yml").exists()
    # Named after its directory: the advice is --name, and nothing is made.
    result = sqlite_cli_server.run("site", "init", str(tmp_path / "123"))
    assert result.returncode != 0
    line = one_error_line(result)
    assert "named '123' after its directory" in line and "--name site-123" in line, line
    assert not (tmp_path / "123").exists()


def test_error_lines_show_stored_names_escaped(sqlite_cli_server: CliServer, world: dict[str, Any]) -> None:
    """`job ls --site nope` listed "your sites: ..." with a stored U+202E raw, which
    reversed the rest of the error line on screen (and a C1 character reached the
    terminal). Error lines now escape what the tables escape."""
    server = sqlite_cli_server
    site = server.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name="err-bidi", hostname="localhost", path=str(server.home / "err-bidi")))).site
    stored_before_the_rule(server, "sites", site.id, "name", "ef\u202egh\u009b")
    for args, code in ((["job", "ls", "--site", "nope"], 2), (["site", "rm", "nope", "--yes"], 1)):
        result = server.run(*args)
        assert result.returncode == code, result.stderr
        assert "ef\\u202egh\\x9b" in result.stderr, result.stderr
        assert "\u202e" not in result.stderr and "\u009b" not in result.stderr
