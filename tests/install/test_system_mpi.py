"""A launcher install against an MPI already on the machine, as on a supercomputer
(docs/install.md, "A supercomputer"): a fresh venv with the `launcher` extra and mpi4py
built from source with the system's compiler wrapper
(`MPICC=mpicc pip install --no-binary=mpi4py`), checked to load the system's MPI library
(the one a C program built with that mpicc loads) and not a wheel's, then an MPI job run
through the launcher under the system's mpiexec.

CI installs Debian's MPICH first (scripts/run_tests.sh: `apt-get install -y libmpich-dev
mpich`) and sets BALSAM_TEST_SYSTEM_MPI=1, so a missing mpicc fails there; elsewhere the
test skips, saying why, unless an mpicc is on PATH (the dev venv's own, from the `mpich`
wheel, does not count). BALSAM_TEST_MPICC names another compiler wrapper.

Cost: the venv is made once per run. mpi4py is compiled without optimisation (CFLAGS
-O0: what is tested is which MPI it links, and -O3 of its one large C file takes minutes)
and only on the first run: pip keeps the wheel it built in a cache of this test's own
($XDG_CACHE_HOME/balsam-grpc-tests/pip-system-mpi, which scripts/run_tests.sh puts in the
checkout, so an unoptimised mpi4py never reaches a user's pip cache); a cached build made
against another MPI would fail the library check.
Its size and time are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launcher.conftest import S, Server, Site
from tests.install.conftest import dir_mb

# Compiling mpi4py takes minutes on a first run without pip's cache (a busy 2-core machine).
pytestmark = pytest.mark.timeout(1200)

HELLO_C = "#include <mpi.h>\nint main(int c, char **v) { MPI_Init(&c, &v); return MPI_Finalize(); }\n"

PROBE = textwrap.dedent('''
    import json, mpi4py
    from mpi4py import MPI
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libmpi" in line})
    print(json.dumps({"config": mpi4py.get_config(), "version": MPI.Get_library_version(), "libs": libs}))
''')


def _system_path() -> str:
    """PATH without the dev venv's bin (whose mpicc and mpiexec come from the mpich wheel)."""
    dev_bin = Path(sys.prefix, "bin").resolve()
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != dev_bin)


def system_mpicc() -> Path | None:
    named = os.environ.get("BALSAM_TEST_MPICC")
    if named:
        return Path(named)
    found = shutil.which("mpicc", path=_system_path())
    return Path(found) if found else None


def _run(argv: list[str], *, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run in a session of its own, so the compilers pip starts are stopped with it if the
    test is stopped (a timeout, Ctrl-C)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def mpi_venv(tmp_path_factory: pytest.TempPathFactory, project_wheel: Path) -> Iterator[tuple[Path, Path]]:
    mpicc = system_mpicc()
    if mpicc is None:
        if os.environ.get("BALSAM_TEST_SYSTEM_MPI") == "1":
            pytest.fail("BALSAM_TEST_SYSTEM_MPI=1 but no mpicc on PATH: the system MPI was not installed")
        pytest.skip("no system MPI (no mpicc on PATH outside the dev venv); CI installs one with "
                    "`apt-get install -y libmpich-dev mpich`")
    tmp = tmp_path_factory.mktemp("launcher-system-mpi")
    venv = tmp / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {**os.environ, "MPICC": str(mpicc), "PATH": f"{mpicc.parent}{os.pathsep}{_system_path()}",
           "CFLAGS": "-O0 -g0"}
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "balsam-grpc-tests" / "pip-system-mpi"
    # The dev venv's pip installs into the new venv (--python), as `pip install` would inside it.
    code, output = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                         "--disable-pip-version-check", "-q", "--cache-dir", str(cache), "--no-binary=mpi4py",
                         f"{project_wheel}[launcher]"], env=env, timeout=1000)
    assert code == 0, output[-5000:]
    print(f"\nlauncher venv with mpi4py built against {mpicc}: {dir_mb(venv):.0f} MB, "
          f"{time.monotonic() - started:.0f} s to make (load {os.getloadavg()[0]:.1f})")
    try:
        yield venv, mpicc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _linked_mpi(mpicc: Path, tmp: Path) -> set[str]:
    """The MPI libraries a C program built with `mpicc` loads (what "the system's MPI" is)."""
    (tmp / "hello.c").write_text(HELLO_C)
    subprocess.run([str(mpicc), "-o", str(tmp / "hello"), str(tmp / "hello.c")], check=True, capture_output=True,
                   timeout=120)
    ldd = subprocess.run(["ldd", str(tmp / "hello")], check=True, capture_output=True, text=True).stdout
    return {os.path.realpath(line.split("=>")[1].split()[0]) for line in ldd.splitlines()
            if "libmpi" in line and "=>" in line}


def test_mpi4py_is_built_against_the_system_mpi(mpi_venv: tuple[Path, Path], tmp_path: Path) -> None:
    venv, mpicc = mpi_venv
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    names = {d.name.split("-")[0].lower() for d in site_packages.glob("*.dist-info")}
    assert "mpi4py" in names and "mpich" not in names, sorted(names)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PATH": _system_path()})
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    print(f"\nmpi4py config {found['config']}; libraries {found['libs']}; "
          f"{found['version'].splitlines()[0]}")
    assert "MPICH" in found["version"]
    # The same library a program compiled with that mpicc loads, none from the new venv.
    system = _linked_mpi(mpicc, tmp_path)
    assert system and {os.path.realpath(lib) for lib in found["libs"]} == system, (found["libs"], system)
    assert not any(lib.startswith(str(venv)) for lib in found["libs"]), found["libs"]


def test_an_mpi_job_runs_through_the_launcher_on_the_system_mpi(mpi_venv: tuple[Path, Path], tmp_path: Path) -> None:
    venv, mpicc = mpi_venv
    python, mpiexec = venv / "bin" / "python", mpicc.parent / "mpiexec"
    server = Server(f"sqlite:///{tmp_path / 'balsam.db'}")
    launcher = None
    try:
        site = Site(server, tmp_path / "site")
        hello = site.app("hello", f"{python} -c 'import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
                                  "sys.stdout.write(\"rank %d of %d %s\\n\" % (c.Get_rank(), c.Get_size(), "
                                  "MPI.Get_library_version().split()[0]))'")
        (job,) = site.jobs(hello, resources={"ranks_per_node": 2})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BALSAM_", "PYTHON"))}
        env.update(BALSAM_SERVER=server.address, BALSAM_TOKEN=server.token, BALSAM_LOG_LEVEL="INFO",
                   PATH=f"{venv / 'bin'}{os.pathsep}{mpicc.parent}{os.pathsep}{_system_path()}")
        log_path = tmp_path / f"launcher-{secrets.token_hex(3)}.log"
        with open(log_path, "wb") as log:
            launcher = subprocess.Popen([str(mpiexec), "-n", "2", str(python), "-m", "balsam_grpc.launcher",
                                         "--site-dir", str(site.path), "--mode", "mpi", "--cpus-per-node", "2",
                                         "--idle-timeout", "2", "--progress-interval", "1"],
                                        cwd=site.path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            launcher.log_path = log_path  # type: ignore[attr-defined]
            site.wait_states([job.id], S.JOB_STATE_JOB_FINISHED, timeout=60, proc=launcher)
            assert launcher.wait(60) == 0, log_path.read_text(errors="replace")[-3000:]
        out = (site.path / "data" / job.workdir / "job.out").read_text()
        assert "rank 0 of 2 MPICH" in out and "rank 1 of 2 MPICH" in out, out
    finally:
        if launcher is not None and launcher.poll() is None:
            os.killpg(launcher.pid, 9)
            launcher.wait(10)
        server.close()
