"""scripts/bench_e2e.py, small: it runs the real user path (server, `balsamctl site init`,
daemon, local scheduler, pilot) and reports every figure, so it does not rot. No timing
is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_e2e.py"
JOBS = 200


@pytest.mark.timeout(150)
def test_bench_e2e_runs_the_real_path_and_reports() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BALSAM_SERVER", "BALSAM_TOKEN", "BALSAM_HOME")}
    # 200 jobs: CPU time is counted in 10 ms ticks, and 20 jobs cost the launcher or the
    # server less than one (a run reported 0.0 ms per job and failed the check below).
    done = subprocess.run([sys.executable, str(SCRIPT), "-n", str(JOBS), "--latency-samples", "3", "--json"],
                          capture_output=True, text=True, timeout=140, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["database"] == "sqlite" and figures["jobs"] == JOBS
    assert figures["jobs_per_s"] > 0 and figures["makespan_s"] > 0
    assert 0 < figures["submit_to_running_p50_ms"] <= figures["submit_to_running_p99_ms"]
    # The pilot really ran the jobs: its launcher and the server spent CPU on them.
    assert figures["launcher_cpu_ms_per_job"] > 0 and figures["server_cpu_ms_per_job"] > 0
    # The launcher's job watchdog is told of every job: its CPU is in the total too (may
    # be 0 here: the jobs cost it less than the kernel's 10 ms accounting tick).
    assert figures["watchdog_cpu_ms_per_job"] >= 0
    assert figures["total_cpu_ms_per_job"] == pytest.approx(sum(figures[f"{k}_cpu_ms_per_job"] for k in (
        "server", "launcher", "watchdog", "daemon", "database")), abs=0.02)
    assert figures["database_cpu_ms_per_job"] == 0  # SQLite: inside the server
    # The SDK's create and wait ran in the benchmark's own process: counted apart (may be
    # 0 here too: the jobs' create and wait can take less than one 10 ms tick).
    assert figures["client_cpu_ms_per_job"] >= 0
    for proc in ("server", "launcher", "daemon"):
        assert figures[f"{proc}_rss_mb"] > 0
    assert "parsl_htex" not in figures
