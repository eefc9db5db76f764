"""Cobalt (ALCF Theta, retired in 2023; kept for sites still running it): qsub, qstat, qdel,
nodelist.

Cobalt forgets a job as soon as it ends and keeps no queryable history (the exit status is
in the job's .cobaltlog), so a requested id missing from a successful qstat is reported
"finished" with exit_code None.

Finding a pilot by name asks qstat with a JobName column (last, so a name with spaces
cannot shift the others). With no history, only live jobs can be found: a pilot that was
accepted, ran and ended entirely while the site daemon was down is not found (the one case
where a crash mid-submit can still lead to a second submission on Cobalt).
"""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .base import (
    BackfillWindow,
    SchedulerAdapter,
    SchedulerJob,
    SchedulerUnavailable,
    State,
    parse_hms_min,
    submit_result,
    to_int,
)

QSTAT_HEADER = ["JobID", "Queue", "Nodes", "WallTime", "RunTime", "State"]
QSTAT_NAMED_HEADER = [*QSTAT_HEADER, "JobName"]

_STATES: dict[str, State] = {
    "queued": "queued", "user_hold": "queued", "admin_hold": "queued", "dep_hold": "queued",
    "maxrun_hold": "queued", "user_hold_dep_hold": "queued", "starting": "running", "running": "running",
    "exiting": "running", "killing": "running", "cleanup": "running", "cleanup_pending": "running",
    "done": "finished", "dep_fail": "failed", "failed": "failed",
}


def map_state(text: str) -> State:
    return _STATES.get((text or "").strip().lower(), "unknown")


def render_submit_argv(script_path: Path, *, project: str, queue: str, num_nodes: int, wall_time_min: int,
                       job_name: str, cwd: Path, extra_flags: list[str] = ()) -> list[str]:
    argv = ["qsub", "--mode", "script", "-n", str(int(num_nodes)), "-t", str(int(wall_time_min)),
            "--jobname", job_name, "--cwd", str(cwd)]
    if queue:
        argv += ["-q", queue]
    if project:
        argv += ["-A", project]
    argv += list(extra_flags)
    argv.append(str(script_path))
    return argv


def render_status_argv(user: str) -> list[str]:
    return ["qstat", "-u", user, "--header", ":".join(QSTAT_HEADER)]


def render_find_argv(user: str) -> list[str]:
    """Cobalt's qstat has no name filter: every job of the user, with names."""
    return ["qstat", "-u", user, "--header", ":".join(QSTAT_NAMED_HEADER)]


def render_cancel_argv(scheduler_id: str) -> list[str]:
    return ["qdel", scheduler_id]


def render_backfill_argv() -> list[str]:
    return ["nodelist"]


def parse_submit_output(stdout: str) -> str | None:
    """qsub prints the numeric job id as its last line (routing notes go to stderr)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.strip().isdigit():
            return line.strip()
    return None


def _table(stdout: str) -> tuple[list[str], list[list[str]]] | None:
    """A Cobalt table: a header line, a line of '=' and whitespace-separated rows. A last
    JobName column takes the rest of its row (a job name may hold spaces)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return [], []
    if len(lines) < 2 or not set(lines[1].strip()) <= {"="}:
        return None
    header = lines[0].split()
    if header and header[-1] == "JobName":
        return header, [ln.split(None, len(header) - 1) for ln in lines[2:]]
    return header, [ln.split() for ln in lines[2:]]


def parse_qstat_output(stdout: str, *, now: datetime | None = None) -> dict[str, SchedulerJob] | None:
    table = _table(stdout)
    if table is None:
        return None
    header, rows = table
    if not rows:
        return {}
    if any(col not in header for col in ("JobID", "State")):
        return None
    idx = {name: i for i, name in enumerate(header)}
    now = now or datetime.now(UTC)
    jobs: dict[str, SchedulerJob] = {}
    for row in rows:
        if len(row) != len(header) or not row[idx["JobID"]].isdigit():
            return None

        def col(name: str, row: list[str] = row) -> str:
            return row[idx[name]] if name in idx else ""

        state = map_state(col("State"))
        run_min = parse_hms_min(col("RunTime"))
        start = now - timedelta(minutes=run_min) if state == "running" and run_min is not None else None
        jid = col("JobID")
        jobs[jid] = SchedulerJob(scheduler_id=jid, state=state, queue=col("Queue"), num_nodes=to_int(col("Nodes")),
                                 wall_time_min=parse_hms_min(col("WallTime")), start_time=start,
                                 message=col("State"), name=col("JobName").strip())
    return jobs


def parse_qstat_by_name(stdout: str, name: str, *, now: datetime | None = None) -> list[SchedulerJob] | None:
    """The jobs of a qstat table (with a JobName column) named exactly `name`."""
    jobs = parse_qstat_output(stdout, now=now)
    return None if jobs is None else [j for j in jobs.values() if j.name == name]


def parse_nodelist_output(stdout: str) -> list[BackfillWindow] | None:
    """Idle nodes with a backfill time ("H:MM:SS"; "-" means none), grouped by the first
    queue they serve and the window length in minutes (rounded down: a job must end inside)."""
    table = _table(stdout)
    if table is None:
        return None
    header, rows = table
    if not rows:
        return []
    if any(c not in header for c in ("Queues", "Status", "Backfill")):
        return None
    idx = {name: i for i, name in enumerate(header)}
    groups: dict[tuple[str, int], int] = {}
    for row in rows:
        if len(row) != len(header):
            return None
        if row[idx["Status"]] != "idle":
            continue
        m = re.fullmatch(r"(\d+):(\d{2}):(\d{2})", row[idx["Backfill"]])
        if not m:
            continue
        minutes = int(m.group(1)) * 60 + int(m.group(2))
        if minutes <= 0:
            continue
        key = (row[idx["Queues"]].split(":")[0], minutes)
        groups[key] = groups.get(key, 0) + 1
    return [BackfillWindow(num_nodes=n, wall_time_min=m, queue=q) for (q, m), n in sorted(groups.items())]


class CobaltScheduler(SchedulerAdapter):
    name = "cobalt"
    default_template = "cobalt.sh"
    submit_command = "qsub"

    def directive_line(self, key: str, value: str) -> str:
        return f"#COBALT --attrs {key}={value}"

    def __init__(self, *, user: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.user = user or getpass.getuser()

    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        Path(script_path).chmod(Path(script_path).stat().st_mode | 0o100)  # --mode script executes it
        argv = render_submit_argv(script_path, project=project, queue=queue, num_nodes=num_nodes,
                                  wall_time_min=wall_time_min, job_name=job_name, cwd=cwd,
                                  extra_flags=self.submit_flags)
        return submit_result(await self.run(argv, cwd=cwd), parse_submit_output)

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        if ids is not None and not ids:
            return {}
        res = await self.run(render_status_argv(self.user))
        if not res.ok:
            return None
        jobs = parse_qstat_output(res.stdout)
        if jobs is None or ids is None:
            return jobs
        return {jid: jobs.get(jid) or SchedulerJob(scheduler_id=jid, state="finished",
                                                   message="no longer in qstat; exit status unknown (see .cobaltlog)")
                for jid in ids}

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        res = await self.run(render_find_argv(self.user))
        return parse_qstat_by_name(res.stdout, name) if res.ok else None

    async def cancel(self, scheduler_id: str) -> None:
        res = await self.run(render_cancel_argv(scheduler_id))
        if res.ok or re.search(r"not found|no such job|unknown job", res.stderr + res.stdout, re.IGNORECASE):
            return
        raise SchedulerUnavailable(f"qdel {scheduler_id} failed: {res.describe()}")

    async def backfill_windows(self) -> list[BackfillWindow] | None:
        res = await self.run(render_backfill_argv())
        return parse_nodelist_output(res.stdout) if res.ok else None
