#!/usr/bin/env bash
# The one test command: environment, PostgreSQL, contract checks, then pytest.
# Usage: scripts/run_tests.sh [--with-slurm] [pytest args...]   (paths relative to the repo root)
#
# Outside CI it changes nothing on the machine beyond this checkout (.venv, caches) and
# its own PostgreSQL databases, which it drops on exit: no packages installed, nothing
# written under /etc, no daemons left running. --with-slurm (always on under CI=true)
# installs and starts a real Slurm on loopback (scripts/slurm.sh, needs root) for the
# real-Slurm tests, and stops on exit the Slurm daemons it started (a Slurm that was
# already running is left alone).
# Under CI=true it also installs Debian's MPICH (libmpich-dev, mpich) when no mpicc is on
# PATH, for the system-MPI launcher install test.
# Env: CI=true makes an unreachable PostgreSQL and a Slurm that does not start errors;
# BALSAM_TEST_DB_NAME (default balsam_test) names this run's database: it and every
# <name>_* database the tests make are dropped at exit (scripts/test_databases.py);
# BALSAM_TEST_WORKERS (default 2) is the number of pytest-xdist workers (0: in-process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*"; }
case ${CI:-} in "" | false | 0) ci="" ;; *) ci=1 ;; esac
PY=.venv/bin/python
BUF=.venv/bin/buf
with_slurm=$ci
args=()
for arg in "$@"; do
    if [[ $arg == --with-slurm ]]; then with_slurm=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}

# What this run started or made is undone on any exit (failures and Ctrl-C too).
started_slurm=""
made_db=""
run_tmp=""
cleanup() {
    local rc=$?
    if [[ -n $run_tmp ]]; then
        rm -rf "$run_tmp"
    fi
    if [[ -n $made_db ]]; then
        "$PY" scripts/test_databases.py drop "$made_db" || echo "WARNING: could not drop $made_db, ${made_db}_*" >&2
    fi
    if [[ -n $started_slurm ]]; then
        echo "stopping the Slurm daemons this run started (scripts/slurm.sh stop)"
        scripts/slurm.sh stop || echo "WARNING: scripts/slurm.sh stop failed" >&2
    fi
    return "$rc"
}
trap cleanup EXIT

# Every cache the run writes (pip's, matplotlib's, buf's, the system-MPI test's wheel)
# stays in this checkout, so the run leaves nothing behind in the user's home; matplotlib
# also made an empty ~/.config/matplotlib unless given a folder of its own.
export XDG_CACHE_HOME="$PWD/.cache"
export MPLCONFIGDIR="$XDG_CACHE_HOME/matplotlib"

step "environment (scripts/setup_dev.sh)"
scripts/setup_dev.sh

step "PostgreSQL at 127.0.0.1:5432"
pg_up() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p 5432 -t 5
    else
        "$PY" -c 'import psycopg; psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5").close()' 2>/dev/null
    fi
}
if pg_up; then
    db=${BALSAM_TEST_DB_NAME:-balsam_test}
    "$PY" scripts/test_databases.py fresh "$db"
    made_db=$db
    export BALSAM_TEST_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/$db"
    echo "fresh database $db; BALSAM_TEST_DATABASE_URL=$BALSAM_TEST_DATABASE_URL"
elif [[ -n $ci ]]; then
    echo "ERROR: PostgreSQL is not reachable at 127.0.0.1:5432 and CI=${CI}." >&2
    echo "CI must run the server tests on PostgreSQL; a run that skipped it is not green." >&2
    exit 1
else
    echo "WARNING: PostgreSQL not reachable at 127.0.0.1:5432: server tests run on SQLite only" >&2
fi

step "Slurm on loopback (scripts/slurm.sh start)"
# A real Slurm (installed if missing) for tests/site/test_slurm_real.py and the end-to-end
# tests; they run only when BALSAM_TEST_SLURM=1.
if [[ -z $with_slurm ]]; then
    export BALSAM_TEST_SLURM=0
    echo "skipped: the real-Slurm tests skip (--with-slurm installs and starts Slurm; CI does)"
else
    slurm_was_up=""
    if scripts/slurm.sh status >/dev/null 2>&1; then slurm_was_up=1; fi
    if scripts/slurm.sh start; then
        [[ -n $slurm_was_up ]] || started_slurm=1
        export BALSAM_TEST_SLURM=1
        echo "Slurm is up${slurm_was_up:+ (it already was: left running at exit)}; BALSAM_TEST_SLURM=1"
    elif [[ -n $ci ]]; then
        echo "ERROR: Slurm did not start and CI=${CI}: the real-Slurm tests must run in CI." >&2
        exit 1
    else
        export BALSAM_TEST_SLURM=0
        echo "WARNING: Slurm did not start (see above): the real-Slurm tests skip" >&2
    fi
fi

step "Chromium for the dashboard's browser tests"
# tests/dashboard drives Debian's chromium through its chromedriver (Selenium). CI installs
# them and fails if it cannot; elsewhere the browser tests skip, saying why, when they are absent.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "ok: $(chromium --version 2>/dev/null | head -1)"
elif [[ -n $ci ]]; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }; then
        echo "ERROR: could not install chromium and chromium-driver with apt-get and CI=${CI}:" >&2
        echo "the dashboard's browser tests must run in CI." >&2
        exit 1
    fi
    echo "installed: $(chromium --version 2>/dev/null | head -1)"
else
    echo "WARNING: chromium/chromedriver not installed: the dashboard's browser tests skip" >&2
    echo "(apt-get install -y chromium chromium-driver)" >&2
fi

step "a system MPI for the launcher install test (tests/install/test_system_mpi.py)"
# A launcher install built against an MPI already on the machine (mpi4py from source with
# its mpicc), as on a supercomputer. CI installs Debian's MPICH and must run that test;
# elsewhere it runs when an mpicc is on PATH and skips, saying why, otherwise.
if command -v mpicc >/dev/null 2>&1; then
    echo "ok: $(command -v mpicc)"
elif [[ -n $ci ]]; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmpich-dev mpich; }; then
        echo "ERROR: could not install libmpich-dev and mpich with apt-get and CI=${CI}:" >&2
        echo "the system-MPI launcher install test must run in CI." >&2
        exit 1
    fi
    echo "installed: $(command -v mpicc)"
else
    echo "skipped: no mpicc on PATH: the system-MPI launcher install test skips (apt-get install -y libmpich-dev mpich)"
fi
if [[ -n $ci ]]; then
    export BALSAM_TEST_SYSTEM_MPI=1
fi

step "generated stubs (scripts/gen_protos.py --check)"
"$PY" scripts/gen_protos.py --check

step "buf lint"
"$BUF" lint && echo "ok"

step "buf format -d --exit-code"
"$BUF" format -d --exit-code && echo "ok"

step "ruff check (pyproject.toml [tool.ruff]: unused imports, undefined names, bare excepts)"
.venv/bin/ruff check --quiet . && echo "ok"

step "buf breaking against HEAD~1"
if [[ $(git rev-parse --show-toplevel 2>/dev/null) != "$PWD" ]]; then
    echo "skipped: not a git checkout"
elif ! git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then
    echo "skipped: no previous commit (first commit, or a shallow clone)"
elif ! git cat-file -e 'HEAD~1:protos/balsam' 2>/dev/null; then
    echo "skipped: HEAD~1 has no protos/balsam"
else
    "$BUF" breaking --against '.git#ref=HEAD~1' && echo "ok: no breaking change since $(git rev-parse --short HEAD~1)"
fi

step "documentation (mkdocs build --strict)"
docs_site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet --site-dir "$docs_site" && echo "ok"
rm -rf "$docs_site"

workers=${BALSAM_TEST_WORKERS:-2}
step "pytest -q -ra --durations=15 -n $workers --dist loadscope -m 'not runs_last' $*; then the runs_last tests alone"
# The run's own temporary folder, removed at exit: what a killed process leaves in the
# temporary folder (MPICH's hydra_hwloc_xmlfile_* of an mpiexec the fault tests kill, the
# BALSAM_HOME of a pytest that was itself killed) goes with it.
run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/balsam-tests.XXXXXX")
# Others may pass through (not list): PostgreSQL's own user reaches the tablespace that
# the full-disk test mounts in a folder of its own here.
chmod 0711 "$run_tmp"
export TMPDIR=$run_tmp
echo "TMPDIR=$TMPDIR (removed at exit)"
# Two pytest-xdist workers (BALSAM_TEST_WORKERS): most tests wait on processes, sockets
# and the database, and the two cores stayed half idle with one. Each worker has its own
# PostgreSQL database (tests/conftest.py); the Slurm tests share one worker
# (tests/conftest.py, SHARED_WORKER). The tests that restart shared services (marker runs_last:
# PostgreSQL itself) then run alone, with no other test beside them.
rc=0
"$PY" -m pytest -q -ra --durations=15 -n "$workers" --dist loadscope -m "not runs_last" "$@" || rc=$?
last=0
"$PY" -m pytest -q -ra -n 0 -m runs_last "$@" || last=$?
# pytest's 5: it collected no test. One of the two may select nothing (a path without
# runs_last tests); both selecting nothing is a failure, not a pass.
if [[ $rc -eq 5 && $last -eq 5 ]]; then
    echo "ERROR: pytest collected no tests: that is a failure, not a pass" >&2
    exit 5
fi
[[ $rc -eq 5 ]] && rc=0
[[ $last -eq 5 ]] && last=0
exit $((rc != 0 ? rc : last))
