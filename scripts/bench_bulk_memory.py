"""Server memory after large legitimate BatchCreateJobs (issue 12): a server process on a
fresh SQLite database, ROUNDS rounds of CONCURRENT concurrent requests of 10,000 jobs with
4 KB of parameters each (about 40 MiB per request); prints the server's resident memory
(anonymous and file-backed, /proc/PID/status) at the start and 2 s after each round.

    .venv/bin/python scripts/bench_bulk_memory.py [ROUNDS [CONCURRENT]] [NAME=VALUE ...]

NAME=VALUE pairs go into the server's environment (MALLOC_ARENA_MAX=8, for example).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

from balsam_grpc.v1 import (  # noqa: E402
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.server_proc import ServerProcess  # noqa: E402

JOBS = 10_000


def memory(pid: int) -> str:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) // 1024
    return " ".join(f"{k} {v} MiB" for k, v in fields.items())


def main(argv: list[str]) -> None:
    numbers = [a for a in argv if "=" not in a]
    rounds = int(numbers[0]) if numbers else 3
    concurrent = int(numbers[1]) if len(numbers) > 1 else 3
    env = dict(a.split("=", 1) for a in argv if "=" in a)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        server = ServerProcess(home, f"sqlite:///{home / 'balsam.db'}", extra_env=env)
        server.start()
        try:
            assert server.proc is not None
            md = (("authorization", f"Bearer {server.token}"),)
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            with grpc.insecure_channel(server.address, options=options) as channel:
                site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(
                    site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="memory")), metadata=md).site
                app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(
                    app=app_pb2.App(site_id=site.id, name="mem", command_template="echo {{ p }}",
                                    parameters=[app_pb2.AppParameter(name="p")])), metadata=md).app
                create = channel.unary_unary("/balsam.v1.JobService/BatchCreateJobs")
                time.sleep(1)
                print(f"start: {memory(server.proc.pid)}", flush=True)
                for r in range(rounds):
                    bodies = [job_service_pb2.BatchCreateJobsRequest(jobs=[
                        job_pb2.Job(app_id=app.id, workdir=f"r{r}-{k}/{i}", parameters={"p": "x" * 4000})
                        for i in range(JOBS)]).SerializeToString() for k in range(concurrent)]
                    started = time.perf_counter()
                    threads = [threading.Thread(target=create, args=(b,), kwargs={"metadata": md, "timeout": 600})
                               for b in bodies]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    del bodies
                    seconds = time.perf_counter() - started
                    time.sleep(2)
                    print(f"round {r + 1} ({concurrent} x {JOBS:,} jobs, {seconds:.1f} s): "
                          f"{memory(server.proc.pid)}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
