#!/usr/bin/env bash
# The one test command: environment, PostgreSQL, contract checks, then pytest.
# Usage: scripts/run_tests.sh [pytest args...]   (paths relative to the repo root)
# Env: CI=true makes an unreachable PostgreSQL an error; BALSAM_TEST_DB_NAME (default
# balsam_test) names the database that is dropped and recreated for this run; CI=true also makes
# a Slurm that does not start an error (scripts/slurm.sh, needs root), elsewhere a warning.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*"; }
case ${CI:-} in "" | false | 0) ci="" ;; *) ci=1 ;; esac
PY=.venv/bin/python
BUF=.venv/bin/buf

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
    # No DROP ... WITH (FORCE): a concurrent run using the same database should fail here, not
    # lose its connections halfway through.
    "$PY" - "$db" <<'EOF'
import sys
import psycopg
from psycopg import sql

db = sql.Identifier(sys.argv[1])
try:
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(db))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(db))
except psycopg.Error as exc:
    sys.exit(f"cannot recreate database {sys.argv[1]}: {exc}\n(another run using it? set BALSAM_TEST_DB_NAME)")
EOF
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
# tests; they run only when BALSAM_TEST_SLURM=1. Outside CI, BALSAM_TEST_SLURM=0 skips this step.
if [[ -z $ci && ${BALSAM_TEST_SLURM:-} == 0 ]]; then
    echo "skipped: BALSAM_TEST_SLURM=0 (the real-Slurm tests skip)"
elif scripts/slurm.sh start; then
    export BALSAM_TEST_SLURM=1
    echo "Slurm is up; BALSAM_TEST_SLURM=1"
elif [[ -n $ci ]]; then
    echo "ERROR: Slurm did not start and CI=${CI}: the real-Slurm tests must run in CI." >&2
    exit 1
else
    export BALSAM_TEST_SLURM=0
    echo "WARNING: Slurm did not start (see above): the real-Slurm tests skip" >&2
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

step "generated stubs (scripts/gen_protos.py --check)"
"$PY" scripts/gen_protos.py --check

step "buf lint"
"$BUF" lint && echo "ok"

step "buf format -d --exit-code"
"$BUF" format -d --exit-code && echo "ok"

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

step "pytest -q -ra --durations=15 $*"
rc=0
"$PY" -m pytest -q -ra --durations=15 "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "ERROR: pytest collected no tests: that is a failure, not a pass" >&2
fi
exit "$rc"
