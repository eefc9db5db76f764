"""IBM Spectrum LSF (Summit-style `-nnodes`): bsub, `bjobs -a -json -o ...`, bkill.

bjobs keeps ended jobs for CLEAN_PERIOD (default 1 h); an id it reports "not found" is gone:
"finished" with exit_code None. EXIT is failed unless its exit code is the usual end of a
pilot (130 after bkill's SIGINT, 140 at the run limit). LSF reports no backfill windows
usable without site-specific setup, so backfill_windows() is [].

Finding a pilot by name: `bjobs -a -J name -u user` with a job_name column; "not found"
(an ERROR record, or the plain message when nothing matches) means none. Like statuses,
it sees ended jobs only for CLEAN_PERIOD.
"""

from __future__ import annotations

import getpass
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from .base import (
    SchedulerAdapter,
    SchedulerJob,
    SchedulerUnavailable,
    State,
    join_messages,
    local_to_utc,
    submit_result,
    to_int,
)

BJOBS_FIELDS = "jobid stat queue submit_time start_time finish_time exit_code runtimelimit nexec_host"
BJOBS_NAMED_FIELDS = BJOBS_FIELDS + " job_name"
NOT_FOUND = re.compile(r"is not found|no (unfinished |matching )?job found", re.IGNORECASE)
NORMAL_EXIT_CODES = {130, 140}  # bkill (SIGINT), TERM_RUNLIMIT

_STATES: dict[str, State] = {
    "PEND": "queued", "WAIT": "queued", "PSUSP": "queued", "PROV": "queued",
    "RUN": "running", "USUSP": "running", "SSUSP": "running",
    "DONE": "finished", "EXIT": "failed",
}


def map_state(stat: str) -> State:
    return _STATES.get((stat or "").strip().upper(), "unknown")


def render_submit_argv(script_path: Path, *, project: str, queue: str, num_nodes: int, wall_time_min: int,
                       job_name: str, cwd: Path, extra_flags: list[str] = ()) -> list[str]:
    argv = ["bsub", "-nnodes", str(int(num_nodes)), "-W", str(int(wall_time_min)), "-J", job_name,
            "-cwd", str(cwd), "-o", str(Path(cwd) / "lsf-%J.out")]
    if queue:
        argv += ["-q", queue]
    if project:
        argv += ["-P", project]
    argv += list(extra_flags)
    argv.append(str(script_path))
    return argv


def render_status_argv(ids: list[str] | None, user: str) -> list[str]:
    argv = ["bjobs", "-a", "-json", "-o", BJOBS_FIELDS]
    return argv + list(ids) if ids else argv + ["-u", user]


def render_find_argv(name: str, user: str) -> list[str]:
    return ["bjobs", "-a", "-json", "-o", BJOBS_NAMED_FIELDS, "-J", name, "-u", user]


def render_cancel_argv(scheduler_id: str) -> list[str]:
    return ["bkill", scheduler_id]


def parse_submit_output(stdout: str) -> str | None:
    """"Job <12345> is submitted to queue <batch>." """
    m = re.search(r"Job <(\d+)> is submitted", stdout)
    return m.group(1) if m else None


_TIME_FORMATS = ("%b %d %H:%M:%S %Y", "%b %d %H:%M %Y", "%b %d %H:%M:%S", "%b %d %H:%M")


def parse_lsf_time(text: object, *, now: datetime) -> datetime | None:
    """"Nov 21 10:05" (LSF omits the year: the latest such time not after `now`), with an
    optional year or seconds, and an optional trailing flag letter (L, E, X...)."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s+[A-Z]$", "", " ".join(text.split()))
    if not text or text in ("-", "N/A"):
        return None
    for fmt in _TIME_FORMATS:
        try:
            parsed = datetime.strptime(text if "%Y" in fmt else f"{text} {now.year}", fmt if "%Y" in fmt else fmt + " %Y")
        except ValueError:
            continue
        try:
            value = local_to_utc(parsed)
            if "%Y" not in fmt and value > now:
                value = local_to_utc(parsed.replace(year=parsed.year - 1))
        except (ValueError, OverflowError, OSError):
            return None
        return value
    return None


def parse_runtime_limit(text: object) -> int | None:
    """RUNTIMELIMIT like "60.0 min" or "120.0/host"."""
    if not isinstance(text, str):
        return None
    m = re.match(r"\s*(\d+(?:\.\d+)?)", text)
    try:
        return int(float(m.group(1)) + 0.999) if m else None
    except OverflowError:  # so many digits the float is infinite: not a limit
        return None


def _bjobs_job(rec: dict, jid: str, now: datetime) -> SchedulerJob:
    stat = str(rec.get("STAT", ""))
    state = map_state(stat)
    exit_code = to_int(rec.get("EXIT_CODE"))
    if state == "failed" and exit_code in NORMAL_EXIT_CODES:
        state = "finished"
    if state == "finished" and stat == "DONE":
        exit_code = 0
    ended = state in ("finished", "failed")
    hosts = rec.get("NEXEC_HOST")
    return SchedulerJob(
        scheduler_id=jid, state=state, queue=str(rec.get("QUEUE") or ""),
        num_nodes=to_int(hosts) if isinstance(hosts, str | int) else None,
        wall_time_min=parse_runtime_limit(rec.get("RUNTIMELIMIT")),
        submit_time=parse_lsf_time(rec.get("SUBMIT_TIME"), now=now),
        start_time=parse_lsf_time(rec.get("START_TIME"), now=now) if state != "queued" else None,
        end_time=parse_lsf_time(rec.get("FINISH_TIME"), now=now) if ended else None,
        exit_code=exit_code if ended else None,
        message=join_messages(stat, f"exit code {exit_code}" if ended and exit_code else ""),
        name=rec["JOB_NAME"] if isinstance(rec.get("JOB_NAME"), str) else "",
    )


def _bjobs_records(stdout: str) -> list | None:
    if not stdout.strip():
        return None
    try:
        data = json.loads(stdout, strict=False)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("RECORDS"), list):
        return None
    return data["RECORDS"]


def parse_bjobs_json(stdout: str, *, now: datetime | None = None) -> tuple[dict[str, SchedulerJob], set[str]] | None:
    """(jobs, ids LSF says it does not know). None when the output is not bjobs JSON."""
    records = _bjobs_records(stdout)
    if records is None:
        return None
    now = now or datetime.now(UTC)
    jobs: dict[str, SchedulerJob] = {}
    unknown: set[str] = set()
    for rec in records:
        if not isinstance(rec, dict) or not str(rec.get("JOBID", "")).strip():
            return None
        jid = str(rec["JOBID"]).strip()
        if rec.get("ERROR"):
            if "not found" in str(rec["ERROR"]).lower():
                unknown.add(jid)
                continue
            return None
        jobs[jid] = _bjobs_job(rec, jid, now)
    return jobs, unknown


def parse_bjobs_by_name(stdout: str, stderr: str, name: str, *,
                        now: datetime | None = None) -> list[SchedulerJob] | None:
    """The jobs named exactly `name` from `bjobs -J name -json` (with a job_name column):
    [] when bjobs says no job is found (an ERROR record or the plain message); None when
    the output is neither."""
    records = _bjobs_records(stdout)
    if records is None:
        return [] if not stdout.strip() and NOT_FOUND.search(stderr) else None
    now = now or datetime.now(UTC)
    found: list[SchedulerJob] = []
    for rec in records:
        if not isinstance(rec, dict):
            return None
        if rec.get("ERROR"):
            if NOT_FOUND.search(str(rec["ERROR"])):
                continue
            return None
        jid = str(rec.get("JOBID", "")).strip()
        if not jid:
            return None
        job = _bjobs_job(rec, jid, now)
        if job.name == name:
            found.append(job)
    return found


class LsfScheduler(SchedulerAdapter):
    name = "lsf"
    default_template = "lsf.sh"
    submit_command = "bsub"

    def directive_line(self, key: str, value: str) -> str:
        return f"#BSUB -{key} {value}".rstrip()

    def __init__(self, *, user: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.user = user or getpass.getuser()

    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        # bsub runs the script as a command: it must be executable.
        Path(script_path).chmod(Path(script_path).stat().st_mode | 0o100)
        argv = render_submit_argv(script_path, project=project, queue=queue, num_nodes=num_nodes,
                                  wall_time_min=wall_time_min, job_name=job_name, cwd=cwd,
                                  extra_flags=self.submit_flags)
        return submit_result(await self.run(argv, cwd=cwd), parse_submit_output)

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        if ids is not None and not ids:
            return {}
        res = await self.run(render_status_argv(ids, self.user))
        parsed = parse_bjobs_json(res.stdout)
        if parsed is None:
            # "No job found" / "No unfinished job found" when the user has none.
            if ids is None and res.returncode is not None and re.search(r"no (unfinished )?job found", res.stderr, re.I):
                return {}
            return None
        jobs, unknown = parsed
        if not res.ok and not unknown:
            return None
        if ids is None:
            return jobs
        result: dict[str, SchedulerJob] = {}
        for jid in ids:
            if jid in jobs:
                result[jid] = jobs[jid]
            elif jid in unknown:
                result[jid] = SchedulerJob(scheduler_id=jid, state="finished",
                                           message="not found by bjobs (cleaned); exit status unknown")
            else:
                return None
        return result

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        res = await self.run(render_find_argv(name, self.user))
        if res.returncode is None:
            return None
        return parse_bjobs_by_name(res.stdout, res.stderr, name)

    async def cancel(self, scheduler_id: str) -> None:
        res = await self.run(render_cancel_argv(scheduler_id))
        text = res.stderr + res.stdout
        if res.ok or re.search(r"already finished|no matching job|not found", text, re.IGNORECASE):
            return
        raise SchedulerUnavailable(f"bkill {scheduler_id} failed: {res.describe()}")
