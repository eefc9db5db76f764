"""Driving the `local` scheduler adapter from tests: a rendered batch script, a submit,
and a bounded wait (the adapter's calls are coroutines; tests run them one at a time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from balsam_grpc.site.schedulers import get_scheduler, read_template



def run(coro):
    return asyncio.run(coro)


def make_script(tmp_path: Path, name: str, command: str) -> Path:
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    text = sched.render_script(read_template("local.sh"), {
        "launcher_command": command, "num_nodes": 2, "wall_time_min": 5, "queue": "", "project": "",
        "job_name": name, "workdir": str(tmp_path), "env": {"GREETING": "hello there"},
    })
    path = tmp_path / f"{name}.sh"
    path.write_text(text)
    return path


async def submit(sched, script: Path, tmp_path: Path, wall_time_min: int = 5) -> str:
    return await sched.submit(script, project="", queue="", num_nodes=2, wall_time_min=wall_time_min,
                              job_name=script.stem, cwd=tmp_path)


