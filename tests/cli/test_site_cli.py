"""`balsamctl site init` and `site rm` as a user runs them: init checks the directory
before it creates anything on the server and undoes what it did when a later step
fails, so a retry works; rm deletes the site and revokes its tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from balsam_grpc.v1 import auth_service_pb2, site_service_pb2
from tests.cli.conftest import CliServer, one_error_line


@pytest.fixture(scope="module")
def cli_server(sqlite_cli_server: CliServer) -> CliServer:
    """SQLite only: what is checked here is the CLI's and init's own steps; the server's
    site and token store runs on both databases in tests/server."""
    return sqlite_cli_server


def _site_names(cli_server: CliServer) -> list[str]:
    return [s.name for s in cli_server.call("SiteService", "ListSites", site_service_pb2.ListSitesRequest()).sites]


def _site_tokens(cli_server: CliServer, site_id: int) -> list[auth_service_pb2.TokenInfo]:
    tokens = cli_server.call("AuthService", "ListTokens", auth_service_pb2.ListTokensRequest()).tokens
    return [t for t in tokens if t.site_id == site_id]


def test_init_with_an_unusable_path_creates_nothing_and_a_retry_works(cli_server: CliServer,
                                                                       tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = cli_server.run("site", "init", str(blocker / "site"), "--name", "unusable")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "cannot use" in one_error_line(bad) and str(blocker) in bad.stderr
    assert "unusable" not in _site_names(cli_server)

    good = cli_server.run("site", "init", str(tmp_path / "site"), "--name", "unusable")
    assert good.returncode == 0, good.stderr
    assert "unusable" in _site_names(cli_server)
    settings = yaml.safe_load((tmp_path / "site" / "settings.yml").read_text())
    # The local platform is this one machine: one node's worth of pilots, not one per backlog step.
    assert settings["elastic_queue"]["max_total_nodes"] == 1


def test_init_refused_by_the_server_leaves_no_directory(cli_server: CliServer, tmp_path: Path) -> None:
    first = cli_server.run("site", "init", str(tmp_path / "one"), "--name", "taken")
    assert first.returncode == 0, first.stderr
    second = cli_server.run("site", "init", str(tmp_path / "deep" / "two"), "--name", "taken")
    assert second.returncode == 2
    assert "you already have a site named 'taken'" in one_error_line(second)
    assert not (tmp_path / "deep").exists()  # the directory init made is gone again


def test_init_failing_after_the_server_step_deletes_the_site(cli_server: CliServer, tmp_path: Path) -> None:
    site_dir = tmp_path / "half"
    (site_dir / ".token").mkdir(parents=True)  # the token cannot be written
    failed = cli_server.run("site", "init", str(site_dir), "--name", "half-made")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "cannot write the site's files" in one_error_line(failed)
    assert "half-made" not in _site_names(cli_server)
    assert sorted(p.name for p in site_dir.iterdir()) == [".token"]  # what it made is gone, the rest kept

    (site_dir / ".token").rmdir()
    again = cli_server.run("site", "init", str(site_dir), "--name", "half-made")
    assert again.returncode == 0, again.stderr


def test_rm_deletes_the_site_and_revokes_its_tokens(cli_server: CliServer, tmp_path: Path) -> None:
    site_dir = tmp_path / "gone"
    made = cli_server.run("site", "init", str(site_dir), "--name", "to-remove")
    assert made.returncode == 0, made.stderr
    (site,) = [s for s in cli_server.call("SiteService", "ListSites", site_service_pb2.ListSitesRequest()).sites
               if s.name == "to-remove"]
    assert [t.revoked for t in _site_tokens(cli_server, site.id)] == [False]

    refused = cli_server.run("site", "rm", str(site_dir))  # stdin is not a terminal: needs --yes
    assert refused.returncode == 1 and "refusing to delete site" in one_error_line(refused)
    assert "to-remove" in _site_names(cli_server)

    removed = cli_server.run("site", "rm", str(site_dir), "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "revoked 1 site token" in removed.stdout
    assert "to-remove" not in _site_names(cli_server)
    assert _site_tokens(cli_server, site.id) == []  # revoked: no longer listed as active
    assert (site_dir / "settings.yml.deleted").exists() and not (site_dir / "settings.yml").exists()

    again = cli_server.run("site", "init", str(site_dir), "--name", "to-remove")
    assert again.returncode == 0, again.stderr
    missing = cli_server.run("site", "rm", "no-such-site", "--yes")
    assert missing.returncode == 1 and "no site 'no-such-site'" in one_error_line(missing)


def test_start_shows_only_this_runs_log_and_warns_on_broken_apps(cli_server: CliServer, tmp_path: Path) -> None:
    site_dir = tmp_path / "starter"
    made = cli_server.run("site", "init", str(site_dir), "--name", "starter")
    assert made.returncode == 0, made.stderr
    settings = site_dir / "settings.yml"
    good = settings.read_text()
    (site_dir / "logs" / "site.log").write_text("STALE LINE FROM AN EARLIER RUN\n")
    # Two mistakes: both are reported in one run, each with its key and what it allows.
    assert "mode: serial " in good
    settings.write_text(good.replace("mode: serial ", "mode: parallel ", 1) + "no_such_setting: 1\n")
    failed = cli_server.run("site", "start", str(site_dir), "--wait", "60")
    assert failed.returncode == 1
    assert "unknown key no_such_setting" in failed.stderr and "STALE LINE" not in failed.stderr, failed.stderr
    assert "launcher.mode must be one of serial, mpi, got 'parallel'" in failed.stderr, failed.stderr

    settings.write_text(good)
    (site_dir / "apps" / "broken.py").write_text("import no_such_module_for_this_test\n")
    started = cli_server.run("site", "start", str(site_dir), "--wait", "90")
    try:
        assert started.returncode == 0, started.stderr
        assert "warning: the apps folder did not load" in started.stderr
        assert "no_such_module_for_this_test" in started.stderr
    finally:
        stopped = cli_server.run("site", "stop", str(site_dir), "--timeout", "60", "--force")
        assert stopped.returncode == 0, stopped.stderr
