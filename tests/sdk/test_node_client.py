"""The Node.js example client (examples/node, @grpc/grpc-js loading protos/ directly)
against a real server process: it creates jobs, watches their events while changing
their states, and its output is checked against the server's event log.

Runs for real in CI (node and npm exist there); outside CI a missing node skips with
the reason printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from balsam_grpc.sdk import Client

from tests.support.server_proc import REPO, ServerProcess

NODE_DIR = REPO / "examples" / "node"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if _in_ci():
            pytest.fail(f"{name} is not installed but CI must run the Node.js client")
        print(f"skipping: {name} not found on PATH")
        pytest.skip(f"{name} not found on PATH (CI runs this test)")
    return found


def _npm_ci(npm: str) -> None:
    """`npm ci` unless node_modules already matches package-lock.json (npm writes its
    own copy of the lock file into node_modules when it installs)."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'balsam.db'}")
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.timeout(300)
def test_node_client_creates_jobs_and_watches_their_events(server: ServerProcess) -> None:
    node = _tool("node")
    npm = _tool("npm")
    _npm_ci(npm)
    env = {**server.env, "BALSAM_SERVER": server.address, "BALSAM_TOKEN": server.token}
    run = subprocess.run([node, "client.js", "--jobs", "4"], cwd=NODE_DIR, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, f"node client failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "created" and kinds[1] == "watching" and kinds[-1] == "done"

    created = lines[0]
    job_ids = [int(i) for i in created["job_ids"]]
    assert len(job_ids) == 4 and set(created["states"]) == {"JOB_STATE_PREPROCESSED"}
    events = [line for line in lines if line["type"] == "event"]
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)  # in order
    transitions = [(int(e["job_id"]), e["to"].removeprefix("JOB_STATE_")) for e in events]
    first, rest = job_ids[0], job_ids[1:]
    assert transitions == [(first, "RUNNING"), (first, "JOB_FINISHED")] + [(j, "KILLED") for j in rest]
    assert lines[-1]["by_state"] == {"JOB_STATE_JOB_FINISHED": 1, "JOB_STATE_KILLED": 3}
    assert next(line for line in lines if line["type"] == "killed") == {"type": "killed", "updated": 3, "failed": 0}
    assert next(line for line in lines if line["type"] == "ran") == {"type": "ran", "job_id": str(first)}

    # What node saw is exactly the server's event log after its starting cursor.
    with Client(server.address, token=server.token) as client:
        cursor = int(lines[1]["cursor"])
        log = [e for e in client.events.filter(job=job_ids) if e.id > cursor]
        assert [e.id for e in log] == [int(e["id"]) for e in events]
        assert {j.state for j in client.jobs.filter(id=job_ids)} == {"JOB_FINISHED", "KILLED"}
