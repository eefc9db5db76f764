"""Figures of the site's transfer service with the local (file://) backend, no server:

- copy rate of one large file and of a tree of small files (copy_path);
- batching: N items accepted at once become ceil(N / batch_size) tasks, at most
  max_tasks_per_location at a time; time from accept to the last final report.

    .venv/bin/python scripts/bench_transfers.py [--mb 200] [--items 400] [--batch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from balsam_grpc.site.transfers.backends.local import copy_path
from balsam_grpc.site.transfers.config import TransferSettings
from balsam_grpc.site.transfers.journal import TransferJournal
from balsam_grpc.site.transfers.service import TransferService
from balsam_grpc.v1 import common_pb2, transfer_item_pb2

T = transfer_item_pb2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        big = tmp / "big.bin"
        with open(big, "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        stats = copy_path(big, tmp / "copy" / "big.bin", False)
        dt = time.perf_counter() - t0
        print(f"large file: {stats.bytes / 1e6:.0f} MB in {dt:.2f} s = {stats.bytes / 1e6 / dt:.0f} MB/s")
        tree = tmp / "tree"
        tree.mkdir()
        for i in range(2000):
            (tree / f"f{i:04d}.dat").write_bytes(os.urandom(4096))
        t0 = time.perf_counter()
        stats = copy_path(tree, tmp / "tree-copy", True)
        dt = time.perf_counter() - t0
        print(f"small files: {stats.files} x 4 kB in {dt:.2f} s = {stats.files / dt:.0f} files/s")
        t0 = time.perf_counter()
        again = copy_path(tree, tmp / "tree-copy", True)
        dt = time.perf_counter() - t0
        print(f"resume over a complete copy: {again.skipped_files} files skipped in {dt:.2f} s, "
              f"{again.copied_bytes} bytes copied")

        src = tmp / "aps"
        src.mkdir()
        for i in range(args.items):
            (src / f"in{i}.dat").write_bytes(os.urandom(16384))
        data = tmp / "site" / "data"
        data.mkdir(parents=True)
        reports: list = []
        settings = TransferSettings(batch_size=args.batch, batch_linger_s=0.05, max_tasks_per_location=2)
        service = TransferService(settings=settings, locations={"aps": f"file://{src}"}, data_dir=data,
                                  journal=TransferJournal(tmp / "j.sqlite"), report=reports.append)
        items = [T.TransferItem(id=i + 1, job_id=i + 1, direction=common_pb2.TRANSFER_DIRECTION_IN,
                                location_alias="aps", remote_path=f"/in{i}.dat", local_path="in.dat",
                                job_workdir=f"w{i}") for i in range(args.items)]

        async def run() -> float:
            t0 = time.perf_counter()
            await service.accept(items)
            runner = asyncio.create_task(service.run())
            while sum(len(r.transfers.items) for r in reports if r.work_id.endswith(":final")) < args.items:
                await asyncio.sleep(0.005)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            return time.perf_counter() - t0

        dt = asyncio.run(run())
        finals = [r for r in reports if r.work_id.endswith(":final")]
        print(f"batching: {args.items} items, batch_size {args.batch}, 2 tasks in flight -> {len(finals)} tasks, "
              f"{len(reports)} reports to the server (instead of {2 * args.items} per-item), all done in {dt:.2f} s "
              f"({args.items / dt:.0f} items/s)")


if __name__ == "__main__":
    main()
