"""The mpi4py master/worker launcher under a real `mpiexec` (the mpich wheel): 3 ranks,
one per virtual node, serial jobs packed with node_packing_count and a 2-rank MPI job."""

from __future__ import annotations

import sys

from tests.launcher.conftest import Launcher, S

# {{ n }} reaches the script as its first positional parameter, not as script text.
BARRIER = ("/bin/sh -c 'touch ../../barrier/$BALSAM_JOB_ID; n=0; "
           "while [ $(ls ../../barrier | wc -l) -lt \"$1\" ]; do sleep 0.05; n=$((n+1)); "
           "[ $n -gt 300 ] && exit 9; done; echo together' barrier {{ n }}")


def test_mpi_ranks_pack_serial_jobs_and_launch_an_mpi_job(site, launchers):
    (site.path / "data" / "barrier").mkdir(parents=True)
    barrier = site.app("barrier", BARRIER, params=("n",))
    hello = site.app("hello", sys.executable + " -c 'import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
                              "sys.stdout.write(\"rank %d of %d\\n\" % (c.Get_rank(), c.Get_size()))'")
    # 6 jobs that can only finish if all 6 run at once: 3 nodes x packing 2 (2 CPUs per node).
    packed = site.jobs(barrier, 6, parameters={"n": "6"}, resources={"node_packing_count": 2})
    mpi_job = site.jobs(hello, resources={"ranks_per_node": 2}, priority=-1)[0]
    launchers.append(launcher := Launcher(site, "--mode", "mpi", "--cpus-per-node", "2", "--idle-timeout", "2",
                                          ranks=3))
    site.wait_states([j.id for j in packed] + [mpi_job.id], S.JOB_STATE_JOB_FINISHED, timeout=40,
                     proc=launcher.proc)
    assert all((site.path / "data" / j.workdir / "job.out").read_text().strip() == "together" for j in packed)
    out = (site.path / "data" / mpi_job.workdir / "job.out").read_text()
    assert "rank 0 of 2" in out and "rank 1 of 2" in out
    assert launcher.wait(30) == 0, launcher.text()[-3000:]
    assert '"ranks": 3' in launcher.text()
