"""site.processes: the one process-table scan for a process whose argv names a file."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from balsam_grpc.site.processes import processes_naming

NAP = "import time; time.sleep(60)"


def test_finds_a_process_by_an_argument_and_filters_by_program_and_other_argument(tmp_path):
    target = tmp_path / "job.json"
    proc = subprocess.Popen([sys.executable, "-c", NAP, str(target), "--marker"])
    try:
        python = os.path.basename(sys.executable)
        assert processes_naming(target) == [proc.pid]
        assert processes_naming(str(target), program=python, with_arg="--marker") == [proc.pid]
        assert processes_naming(target, program="sbatch") == []
        assert processes_naming(target, with_arg="--other") == []
        assert processes_naming(tmp_path / "other.json") == []
        # An argument only containing the path does not name it.
        assert processes_naming(tmp_path) == []
    finally:
        proc.kill()
        proc.wait()
    assert processes_naming(target) == []


def test_never_names_this_process():
    own_argv = psutil.Process().cmdline()
    assert len(own_argv) > 1
    assert os.getpid() not in processes_naming(own_argv[-1])
