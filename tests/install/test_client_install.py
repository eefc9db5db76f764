"""A client-only install (`pip install balsam-grpc`, no extras) into a fresh venv: the
SDK and `balsamctl` work against a server, and nothing of the server, MPI or plotting
is installed or imported. Prints the venv's size.

The wheel is built once from this checkout with the dev venv's setuptools (no build
isolation: nothing to download for the build); its dependencies come from pip's cache
or the index, as for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.install.conftest import dir_mb
from tests.support.server_proc import ServerProcess

# One build of the wheel for this folder: its files share a pytest-xdist worker
# (tests/conftest.py, SHARED_WORKER).

ROUND_TRIP = textwrap.dedent('''
    import sys
    from balsam_grpc.sdk import Client

    with Client() as client:
        site = client.sites.create(name="client-only", hostname="laptop", path="/tmp/site")
        app = client.apps.create(site_id=site.id, name="echo", command_template="echo {{ word }}",
                                 parameters=[{"name": "word", "required": True}])
        job = client.jobs.create(app_id=app.id, workdir="client-only/1", parameters={"word": "hi"},
                                 tags={"install": "client"})
        again = client.jobs.get(id=job.id)
        assert again.parameters == {"word": "hi"}, again.parameters
        print("round trip", job.id, again.state)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                   {"sqlalchemy", "alembic", "psycopg", "numpy", "matplotlib", "mpi4py", "globus_sdk", "psutil"}
                   or m.startswith("balsam_grpc.server"))
    assert not heavy, heavy
''')


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory, project_wheel: Path) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("client-install")
    venv, wheel = tmp / "venv", project_wheel
    # No pip in the new venv: the dev venv's pip installs into it (--python), which is
    # what `python -m venv` + `pip install` would do, without installing pip twice.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                             "--disable-pip-version-check", "-q", str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nclient-only venv: {dir_mb(venv):.0f} MB")
    try:
        yield venv
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_client_only_install_has_no_server_mpi_or_plotting(client_venv: Path) -> None:
    # The distributions installed: their *.dist-info folders (no pip run needed to ask).
    (site_packages,) = client_venv.glob("lib/python3*/site-packages")
    names = {d.name.split("-")[0].lower().replace("_", "-") for d in site_packages.glob("*.dist-info")}
    assert "balsam-grpc" in names
    for heavy in ("sqlalchemy", "psycopg", "mpi4py", "mpich", "numpy", "matplotlib", "globus-sdk", "starlette"):
        assert heavy not in names, f"{heavy} is installed by a client-only install"


def test_client_only_install_runs_cli_and_sdk_against_a_server(client_venv: Path, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'balsam.db'}")
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BALSAM_", "PYTHON"))}
        env.update(BALSAM_HOME=str(tmp_path / "client-home"), BALSAM_SERVER=server.address,
                   BALSAM_TOKEN=server.token, NO_COLOR="1")
        bindir = client_venv / "bin"
        # Run from outside the checkout: the venv's own copy is what must work.
        help_text = subprocess.run([str(bindir / "balsamctl"), "--help"], capture_output=True, text=True,
                                   env=env, cwd=tmp_path, timeout=60)
        assert help_text.returncode == 0, help_text.stderr
        assert "job" in help_text.stdout and "site" in help_text.stdout
        trip = subprocess.run([str(bindir / "python"), "-c", ROUND_TRIP], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)
        assert trip.returncode == 0, trip.stdout + trip.stderr
        assert "round trip" in trip.stdout
        listed = subprocess.run([str(bindir / "balsamctl"), "job", "ls", "--tag", "install=client", "-o", "json"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert '"client-only/1"' in listed.stdout
        # The server commands say which extra they need instead of a traceback.
        started = subprocess.run([str(bindir / "balsamctl"), "server", "migrate", "--database",
                                  f"sqlite:///{tmp_path / 'other.db'}"], capture_output=True, text=True,
                                 env=env, cwd=tmp_path, timeout=60)
        assert started.returncode != 0
        assert "balsam-grpc[server]" in started.stderr, started.stderr
    finally:
        server.stop()
