"""PBS Pro / OpenPBS with PALS (Polaris, Aurora): qsub, `qstat -f -F json -x`, qdel, pbsnodes.

Job ids are kept as qsub prints them ("123.server.domain"), the keys qstat's JSON uses.
`-x` includes finished jobs (job history). A requested id qstat calls unknown is gone from
history too: reported "finished" with exit_code None. Exit_status: 0 finished; the usual
ends of a pilot (wall time -29, qdel'ed SIGTERM 271) finished; anything else failed.

Finding a pilot by name: `qselect -N name -u user -x` (ids of live and historical jobs with
that name), then `qstat -f -F json -x` on those ids, keeping only an exact Job_Name match
(qselect's -N is exact, but the check costs nothing).
"""

from __future__ import annotations

import getpass
import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from .base import (
    BackfillWindow,
    SchedulerAdapter,
    SchedulerJob,
    SchedulerUnavailable,
    State,
    format_hms,
    join_messages,
    local_to_utc,
    parse_hms_min,
    submit_result,
    to_int,
)

_STATES: dict[str, State] = {
    "Q": "queued", "H": "queued", "W": "queued", "T": "queued", "M": "queued", "B": "running",
    "R": "running", "E": "running", "S": "running", "U": "running",
    "F": "finished", "X": "finished",
}
# Exit_status values that are the normal end of a pilot, not a failure.
NORMAL_EXITS = {0, -29, 271}  # success, JOB_EXEC_KILL_WALLTIME, killed by SIGTERM (qdel)
GONE = re.compile(r"unknown job id|job has finished|job has been deleted", re.IGNORECASE)


def map_state(code: str) -> State:
    return _STATES.get((code or "").strip().upper(), "unknown")


def parse_ctime(text: object) -> datetime | None:
    """PBS times: "Tue Nov 19 10:00:00 2024" (local) or epoch seconds (some versions)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        try:
            return local_to_utc(datetime.fromtimestamp(text))
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(text, str):
        return None
    try:
        return local_to_utc(datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError, OSError):
        return None


# --- render -----------------------------------------------------------------------------------
def render_submit_argv(script_path: Path, *, project: str, queue: str, num_nodes: int, wall_time_min: int,
                       job_name: str, select_suffix: str = "", extra_flags: list[str] = ()) -> list[str]:
    argv = ["qsub", "-N", job_name[:236], "-l", f"select={int(num_nodes)}{select_suffix}",
            "-l", f"walltime={format_hms(wall_time_min)}"]
    if queue:
        argv += ["-q", queue]
    if project:
        argv += ["-A", project]
    argv += list(extra_flags)
    argv.append(str(script_path))
    return argv


def render_status_argv(ids: list[str] | None) -> list[str]:
    """With ids: those jobs, finished ones included (-x). Without: every live job (-u does
    not combine with -f, so the parser filters by owner; no -x, history can be huge)."""
    if ids:
        return ["qstat", "-f", "-F", "json", "-x", *ids]
    return ["qstat", "-f", "-F", "json"]


def render_select_argv(name: str, user: str) -> list[str]:
    """Ids of `user`'s jobs named `name`, finished ones included (-x: job history)."""
    return ["qselect", "-N", name[:236], "-u", user, "-x"]


def render_cancel_argv(scheduler_id: str) -> list[str]:
    return ["qdel", scheduler_id]


def render_backfill_argv() -> list[str]:
    return ["pbsnodes", "-a", "-F", "json"]


# --- parse ------------------------------------------------------------------------------------
def parse_submit_output(stdout: str) -> str | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if re.fullmatch(r"\d+(\[\])?(\.[A-Za-z0-9_.-]+)?", line):
            return line
    return None


def parse_qselect_output(stdout: str) -> list[str] | None:
    """qselect prints one job id per line ("123.server" or "123[].server"); nothing when no
    job matches. None when a line is not a job id."""
    ids = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        if not re.fullmatch(r"\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?", line):
            return None
        ids.append(line)
    return ids


def _load_json(text: str) -> dict | None:
    if not text.strip():
        return None
    try:
        # strict=False: PBS has printed raw control characters inside Variable_List strings.
        data = json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _job(jid: str, attrs: dict) -> SchedulerJob:
    state = map_state(str(attrs.get("job_state", "")))
    rl = attrs.get("Resource_List") if isinstance(attrs.get("Resource_List"), dict) else {}
    exit_status = to_int(attrs.get("Exit_status"))
    if state == "finished" and exit_status is not None and exit_status not in NORMAL_EXITS:
        state = "failed"
    ended = state in ("finished", "failed")
    nodes = to_int(rl.get("nodect"))
    if nodes is None and isinstance(rl.get("select"), str):
        nodes = to_int(rl["select"].split(":")[0])
    return SchedulerJob(
        scheduler_id=jid, state=state, queue=str(attrs.get("queue") or ""), num_nodes=nodes,
        wall_time_min=parse_hms_min(rl.get("walltime") if isinstance(rl.get("walltime"), str) else None),
        submit_time=parse_ctime(attrs.get("qtime") or attrs.get("ctime")),
        start_time=parse_ctime(attrs.get("stime")) if state != "queued" else None,
        end_time=parse_ctime(attrs.get("obittime") or attrs.get("mtime")) if ended else None,
        exit_code=exit_status if ended else None,
        message=join_messages(f"job_state={attrs.get('job_state')}",
                              str(attrs.get("comment") or "") if isinstance(attrs.get("comment"), str) else ""),
        name=attrs["Job_Name"] if isinstance(attrs.get("Job_Name"), str) else "",
    )


def parse_qstat_json(stdout: str, *, owner: str | None = None) -> dict[str, SchedulerJob] | None:
    """Jobs from `qstat -f -F json` (only `owner`'s when given: Job_Owner is "user@host");
    None when the output is not that document. No "Jobs" key is a valid answer: no jobs."""
    data = _load_json(stdout)
    if data is None:
        return None
    jobs = data.get("Jobs", {})
    if not isinstance(jobs, dict):
        return None
    return {str(jid): _job(str(jid), attrs) for jid, attrs in jobs.items()
            if isinstance(attrs, dict)
            and (owner is None or str(attrs.get("Job_Owner", "")).split("@")[0] == owner)}


def parse_qstat_by_name(stdout: str, name: str) -> list[SchedulerJob] | None:
    """The jobs of a `qstat -f -F json` document whose Job_Name is exactly `name`."""
    jobs = parse_qstat_json(stdout)
    return None if jobs is None else [j for j in jobs.values() if j.name == name]


def unknown_ids_in(stderr: str) -> set[str]:
    """Ids qstat/qdel called unknown: "qstat: Unknown Job Id 123.server"."""
    return {m.group(1) for m in re.finditer(r"Unknown Job Id:?\s+(\S+)", stderr, re.IGNORECASE)}


def match_id(wanted: str, jobs: dict[str, SchedulerJob]) -> SchedulerJob | None:
    """qstat may print the full "123.server.domain" for a short "123" (or the reverse)."""
    if wanted in jobs:
        return jobs[wanted]
    head = wanted.split(".")[0]
    for jid, job in jobs.items():
        if jid.split(".")[0] == head:
            return job
    return None


def parse_pbsnodes_json(stdout: str, *, wall_time_min: int, queue: str = "") -> list[BackfillWindow] | None:
    """Free nodes with no jobs form one window. PBS does not say how long they stay free, so
    the window lasts the site's configured `wall_time_min`."""
    data = _load_json(stdout)
    if data is None:
        return None
    nodes = data.get("nodes")
    if not isinstance(nodes, dict):
        return None
    free = sum(1 for n in nodes.values() if isinstance(n, dict) and n.get("state") == "free" and not n.get("jobs"))
    return [BackfillWindow(num_nodes=free, wall_time_min=wall_time_min, queue=queue)] if free else []


class PbsScheduler(SchedulerAdapter):
    name = "pbs"
    default_template = "pbs.sh"
    submit_command = "qsub"

    def directive_line(self, key: str, value: str) -> str:
        return f"#PBS -l {key}={value}"

    def __init__(self, *, user: str | None = None, select_suffix: str = "", backfill_queue: str = "",
                 backfill_wall_time_min: int = 60, **kwargs) -> None:
        """select_suffix: appended to "select=N", e.g. ":system=polaris" or ":ncpus=64"."""
        super().__init__(**kwargs)
        self.user = user or getpass.getuser()
        self.select_suffix = select_suffix
        self.backfill_queue = backfill_queue
        self.backfill_wall_time_min = int(backfill_wall_time_min)

    def render_script(self, template_text: str, context: dict) -> str:
        return super().render_script(template_text, {"select_suffix": self.select_suffix, **context})

    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        argv = render_submit_argv(script_path, project=project, queue=queue, num_nodes=num_nodes,
                                  wall_time_min=wall_time_min, job_name=job_name,
                                  select_suffix=self.select_suffix, extra_flags=self.submit_flags)
        return submit_result(await self.run(argv, cwd=cwd), parse_submit_output)

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        if ids is not None and not ids:
            return {}
        res = await self.run(render_status_argv(ids))
        unknown = unknown_ids_in(res.stderr)
        jobs = parse_qstat_json(res.stdout, owner=None if ids else self.user)
        if jobs is None:
            # Nothing on stdout is fine only when qstat said every id is unknown.
            if ids and res.returncode is not None and not res.stdout.strip() and unknown:
                jobs = {}
            elif res.ok and not res.stdout.strip():
                jobs = {}
            else:
                return None
        elif not res.ok and not unknown:
            return None
        if not ids:
            return jobs
        result: dict[str, SchedulerJob] = {}
        for jid in ids:
            job = match_id(jid, jobs)
            if job is not None:
                result[jid] = job if job.scheduler_id == jid else _rename(job, jid)
            elif jid in unknown or jid.split(".")[0] in {u.split(".")[0] for u in unknown}:
                result[jid] = SchedulerJob(scheduler_id=jid, state="finished",
                                           message="unknown to qstat (history expired); exit status unknown")
            else:
                return None  # qstat answered without it and without saying why: ask again
        return result

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        res = await self.run(render_select_argv(name, self.user))
        ids = parse_qselect_output(res.stdout) if res.ok else None
        if ids is None:
            return None
        if not ids:
            return []
        res = await self.run(render_status_argv(ids))
        jobs = parse_qstat_json(res.stdout) if res.stdout.strip() else {}
        unknown = {u.split(".")[0] for u in unknown_ids_in(res.stderr)}
        if jobs is None or (not res.ok and not unknown):
            return None
        missing = [i for i in ids if match_id(i, jobs) is None]
        if not {i.split(".")[0] for i in missing} <= unknown:
            return None  # qselect named it, qstat neither showed it nor called it unknown: ask again
        # An id qselect listed that left history in between: it existed under this name.
        return [j for j in jobs.values() if j.name == name] + [
            SchedulerJob(scheduler_id=i, state="finished", name=name,
                         message="left qstat history while being looked up; exit status unknown") for i in missing]

    async def cancel(self, scheduler_id: str) -> None:
        res = await self.run(render_cancel_argv(scheduler_id))
        if res.ok or GONE.search(res.stderr):
            return
        raise SchedulerUnavailable(f"qdel {scheduler_id} failed: {res.describe()}")

    async def backfill_windows(self) -> list[BackfillWindow] | None:
        res = await self.run(render_backfill_argv())
        if not res.ok:
            return None
        return parse_pbsnodes_json(res.stdout, wall_time_min=self.backfill_wall_time_min, queue=self.backfill_queue)


def _rename(job: SchedulerJob, jid: str) -> SchedulerJob:
    return replace(job, scheduler_id=jid)
