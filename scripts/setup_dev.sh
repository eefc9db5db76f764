#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the project with the extras the tests need. Idempotent.
# Usage: scripts/setup_dev.sh          (PYTHON=/path/to/python3.x to choose the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP=$VENV/.balsam-dev-installed
# What the tests and the demo need: every extra but `launcher` (mpi4py built against a
# system MPI) and `bench`; `xpcs-check` brings the outside checks of the XPCS reduction
# (pyXPCSViewer's reader, ESRF's correlator). A supercomputer install is different: see
# README, "Installs".
EXTRAS=${BALSAM_DEV_EXTRAS:-dev,server,postgres,site,mpich,globus,plots,dashboard,xpcs-check}

find_python() {
    local c
    for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    echo "setup_dev: need Python >= 3.11 (set PYTHON=...)" >&2
    return 1
}

# A venv whose interpreter vanished (e.g. a removed pyenv version) is rebuilt, not reused.
if [[ -e $VENV ]] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
    echo "setup_dev: $VENV is broken, recreating"
    rm -rf "$VENV"
fi

if [[ ! -e $VENV ]]; then
    py=$(find_python)
    echo "setup_dev: creating $VENV with $py ($("$py" -V 2>&1))"
    "$py" -m venv --without-pip "$VENV"
else
    echo "setup_dev: reusing $VENV ($("$VENV/bin/python" -V))"
fi

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "setup_dev: installing pip into $VENV"
    if "$VENV/bin/python" -c 'import ensurepip' 2>/dev/null; then
        "$VENV/bin/python" -m ensurepip --upgrade --default-pip >/dev/null
    else
        # Debian's python3 has no ensurepip unless python3-venv is installed: fetch pip from PyPI.
        "$VENV/bin/python" - <<'PY'
import json, subprocess, sys, tempfile, urllib.parse, urllib.request
from pathlib import Path
index = "https://pypi.org/pypi/pip/json"
info = json.load(urllib.request.urlopen(index, timeout=60))
wheel = next(u for u in info["urls"] if u["filename"].endswith("-py3-none-any.whl"))
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / wheel["filename"]
    path.write_bytes(urllib.request.urlopen(urllib.parse.urljoin(index, wheel["url"]), timeout=120).read())
    subprocess.check_call([sys.executable, f"{path}/pip", "install", "-q", str(path)])
PY
    fi
fi

# Reinstall only when pyproject.toml changed (or the last install did not finish).
want=$( (cat pyproject.toml; echo "$EXTRAS"; "$VENV/bin/python" -V) | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]] &&
    "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("balsam-grpc")' 2>/dev/null; then
    echo "setup_dev: dependencies up to date"
else
    log=$VENV/pip-install.log
    echo "setup_dev: pip install -e '.[$EXTRAS]' (the first run downloads ~100 packages: 1-3 min; full log: $log)"
    # pip's own log is long and its build-backend warnings ignore -q: show one line per
    # package fetched and the final summary, and the whole log only when it fails.
    set +e
    "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | tee "$log" |
        grep --line-buffered -E '^(Collecting|Building|Installing collected|Successfully installed|ERROR)' |
        sed -u -E 's/^(.{0,150}).*/  \1/'
    status=${PIPESTATUS[0]}
    set -e
    if [[ $status -ne 0 ]]; then
        cat "$log" >&2
        exit 1
    fi
    echo "$want" >"$STAMP"
fi
