"""Slurm: sbatch, squeue, scancel, sacct, sinfo.

Jobs that left squeue: squeue keeps ended jobs for MinJobAge (default 300 s) with their
final state (--states=all). A requested id that squeue no longer knows is looked up with
`sacct` (slurmdbd accounting), then `sacct -c` (jobcomp/filetxt, what scripts/slurm.sh
configures). When neither has a record, the job is reported "finished" with exit_code None
and a message saying so: sbatch only returns an id once slurmctld holds the job, so a job
that squeue answered for (rc 0) and does not list has ended; keeping it "unknown" forever
would leave a pilot that can never be replaced.

Finding a pilot by name (after a crash between sbatch and the journal): `squeue --name`
(live jobs and those ended within MinJobAge), then accounting for older ones. `sacct -c`
(jobcomp/filetxt) ignores --name, --user and --starttime and lists every job it has, so the
parsers keep only exact name matches.
"""

from __future__ import annotations

import getpass
from datetime import datetime
from pathlib import Path

from .base import (
    BackfillWindow,
    SchedulerAdapter,
    SchedulerJob,
    SchedulerUnavailable,
    State,
    join_messages,
    parse_duration_min,
    parse_iso_local,
    submit_result,
    to_int,
)

SEP = "|"
SQUEUE_FORMAT = SEP.join(["%i", "%T", "%P", "%D", "%l", "%V", "%S", "%e", "%r"])
SACCT_FIELDS = "JobID,State,Partition,NNodes,Timelimit,Submit,Start,End,ExitCode"
# The same with the job name last (a name may hold the separator; nothing after it can).
SQUEUE_NAMED_FORMAT = SQUEUE_FORMAT + SEP + "%j"
SACCT_NAMED_FIELDS = SACCT_FIELDS + ",JobName"

# Long names (squeue %T, sacct State) and the short codes (squeue %t), to one vocabulary.
# finished = ended normally, by wall time or by cancellation (a pilot's usual ends);
# failed = ended abnormally.
_STATES: dict[str, State] = {
    "PENDING": "queued", "PD": "queued", "CONFIGURING": "queued", "CF": "queued",
    "REQUEUED": "queued", "RQ": "queued", "REQUEUE_HOLD": "queued", "RH": "queued",
    "REQUEUE_FED": "queued", "RF": "queued", "RESV_DEL_HOLD": "queued", "RD": "queued",
    "RUNNING": "running", "R": "running", "COMPLETING": "running", "CG": "running",
    "SIGNALING": "running", "SI": "running", "STAGE_OUT": "running", "SO": "running",
    "RESIZING": "running", "RS": "running", "SUSPENDED": "running", "S": "running",
    "STOPPED": "running", "ST": "running",
    "COMPLETED": "finished", "CD": "finished", "TIMEOUT": "finished", "TO": "finished",
    "CANCELLED": "finished", "CA": "finished",
    "FAILED": "failed", "F": "failed", "NODE_FAIL": "failed", "NF": "failed",
    "OUT_OF_MEMORY": "failed", "OOM": "failed", "BOOT_FAIL": "failed", "BF": "failed",
    "DEADLINE": "failed", "DL": "failed", "PREEMPTED": "failed", "PR": "failed",
    "REVOKED": "failed", "RV": "failed", "SPECIAL_EXIT": "failed", "SE": "failed",
}
_ENDED = ("finished", "failed")


def map_state(raw: str) -> State:
    # sacct prints "CANCELLED by 0"; squeue may append "+" on some versions.
    word = raw.strip().split(" ")[0].rstrip("+").upper() if raw and raw.strip() else ""
    return _STATES.get(word, "unknown")


# --- render -----------------------------------------------------------------------------------
def render_submit_argv(script_path: Path, *, project: str, queue: str, num_nodes: int, wall_time_min: int,
                       job_name: str, cwd: Path, extra_flags: list[str] = (),
                       queue_flag: str = "--partition") -> list[str]:
    """Command-line flags override the script's #SBATCH lines, so the request is exactly
    what the batch job says even with a hand-edited template."""
    argv = ["sbatch", "--parsable", f"--nodes={int(num_nodes)}", f"--time={int(wall_time_min)}",
            f"--job-name={job_name}", f"--chdir={cwd}"]
    if queue:
        argv.append(f"{queue_flag}={queue}")
    if project:
        argv.append(f"--account={project}")
    argv += list(extra_flags)
    argv.append(str(script_path))
    return argv


def render_status_argv(ids: list[str] | None, user: str) -> list[str]:
    argv = ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
    if ids:
        argv.append("--jobs=" + ",".join(ids))
    else:
        argv.append(f"--user={user}")
    return argv


def render_sacct_argv(ids: list[str], *, jobcomp: bool) -> list[str]:
    argv = ["sacct", "--noheader", "--parsable2", f"--format={SACCT_FIELDS}", "--jobs=" + ",".join(ids)]
    # -X: the allocation's line only, not its steps (not a jobcomp option).
    argv.insert(1, "--completion" if jobcomp else "--allocations")
    return argv


def render_find_argv(name: str, user: str) -> list[str]:
    """Jobs of `user` named exactly `name`, in every state squeue still holds."""
    return ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_NAMED_FORMAT}", f"--name={name}",
            f"--user={user}"]


def render_sacct_find_argv(name: str, user: str, *, jobcomp: bool, since: datetime | None) -> list[str]:
    """Accounting records named `name` since `since` (local time; sacct's default window is
    only today). jobcomp/filetxt ignores these filters: the parser filters by name."""
    argv = ["sacct", "--completion" if jobcomp else "--allocations", "--noheader", "--parsable2",
            f"--format={SACCT_NAMED_FIELDS}", f"--name={name}", f"--user={user}"]
    if since is not None:
        argv.append(f"--starttime={since.strftime('%Y-%m-%dT%H:%M:%S')}")
    return argv


def render_cancel_argv(scheduler_id: str) -> list[str]:
    return ["scancel", scheduler_id]


def render_backfill_argv() -> list[str]:
    # One line per partition and node state: partition, availability, time limit, count, state.
    return ["sinfo", "--noheader", "--format=%R|%a|%l|%D|%t"]


# --- parse ------------------------------------------------------------------------------------
def parse_submit_output(stdout: str) -> str | None:
    """`sbatch --parsable` prints "jobid" or "jobid;cluster"; plain sbatch prints
    "Submitted batch job N". None when neither is there."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("Submitted batch job "):
            line = line.removeprefix("Submitted batch job ")
        head = line.split(";")[0].strip()
        if head.isdigit() or (head.replace("_", "").isdigit() and head[0].isdigit()):
            return head
    return None


def _ended_time(state: State, text: str):
    return parse_iso_local(text) if state in _ENDED else None


def _squeue_job(cols: list[str], name: str = "") -> SchedulerJob | None:
    """One SQUEUE_FORMAT line's 9 columns; None when unreadable."""
    if len(cols) != 9 or not cols[0].strip():
        return None
    jid, raw_state, part, nodes, limit, submit, start, end, reason = (c.strip() for c in cols)
    state = map_state(raw_state)
    if state == "unknown" and not raw_state:
        return None
    started = state in ("running", *_ENDED)
    return SchedulerJob(
        scheduler_id=jid, state=state, queue=part, num_nodes=to_int(nodes),
        wall_time_min=parse_duration_min(limit), submit_time=parse_iso_local(submit),
        start_time=parse_iso_local(start) if started else None,
        end_time=_ended_time(state, end),
        # COMPLETED means every process exited 0; other ends need sacct for the code.
        exit_code=0 if raw_state == "COMPLETED" else None,
        message=join_messages(raw_state, reason if reason not in ("None", "(null)") else ""),
        name=name,
    )


def parse_squeue_output(stdout: str) -> dict[str, SchedulerJob] | None:
    """Lines of SQUEUE_FORMAT. None when any non-empty line is unreadable (the format is ours,
    so a line that does not fit means the output is not what we asked for)."""
    jobs: dict[str, SchedulerJob] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        job = _squeue_job(line.split(SEP))
        if job is None:
            return None
        jobs[job.scheduler_id] = job
    return jobs


def parse_squeue_by_name(stdout: str, name: str) -> list[SchedulerJob] | None:
    """Lines of SQUEUE_NAMED_FORMAT: the jobs named exactly `name` ([] when none); None when
    any line is unreadable."""
    found: list[SchedulerJob] = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP, 9)
        if len(cols) != 10:
            return None
        job = _squeue_job(cols[:9], name=cols[9].strip())
        if job is None:
            return None
        if job.name == name:
            found.append(job)
    return found


def parse_exit_code(text: str) -> int | None:
    """sacct ExitCode "code:signal": the code, or 128+signal when a signal ended it."""
    parts = text.strip().split(":")
    if len(parts) != 2:
        return None
    code, sig = to_int(parts[0]), to_int(parts[1])
    if code is None or sig is None:
        return None
    return 128 + sig if sig else code


def _sacct_job(cols: list[str], name: str = "") -> SchedulerJob | None:
    jid, raw_state, part, nodes, limit, submit, start, end, exit_code = (c.strip() for c in cols)
    state = map_state(raw_state)
    return SchedulerJob(
        scheduler_id=jid, state=state, queue=part, num_nodes=to_int(nodes),
        wall_time_min=parse_duration_min(limit), submit_time=parse_iso_local(submit),
        start_time=parse_iso_local(start) if state != "queued" else None,
        end_time=_ended_time(state, end), exit_code=parse_exit_code(exit_code) if state in _ENDED else None,
        message=raw_state, name=name,
    )


def parse_sacct_output(stdout: str) -> dict[str, SchedulerJob] | None:
    jobs: dict[str, SchedulerJob] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if len(cols) != 9 or not cols[0].strip():
            return None
        if "." in cols[0]:  # a step (batch, extern, 0...), not the allocation
            continue
        job = _sacct_job(cols)
        jobs[job.scheduler_id] = job
    return jobs


def parse_sacct_by_name(stdout: str, name: str) -> list[SchedulerJob] | None:
    """SACCT_NAMED_FIELDS lines: the allocations named exactly `name` ([] when none; steps
    are skipped); None when any line is unreadable. A job requeued or listed twice (jobcomp
    writes a line per end) appears once, with its last line."""
    found: dict[str, SchedulerJob] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP, 9)
        if len(cols) != 10 or not cols[0].strip():
            return None
        if "." in cols[0] or cols[9].strip() != name:
            continue
        job = _sacct_job(cols[:9], name=name)
        found[job.scheduler_id] = job
    return list(found.values())


def parse_sinfo_output(stdout: str, *, max_wall_time_min: int) -> list[BackfillWindow] | None:
    """Idle nodes per partition. sinfo cannot say when a reservation or a queued job will take
    them, so the window lasts the partition's time limit (capped: an UNLIMITED partition
    reports `max_wall_time_min`). "idle*" (not responding), "idle~" (powered off) and other
    suffixed states do not count."""
    counts: dict[str, tuple[int, int]] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(SEP)]
        if len(cols) != 5:
            return None
        part, avail, limit, count, state = cols
        n = to_int(count)
        if n is None:
            return None
        if avail != "up" or state != "idle" or n <= 0:
            continue
        minutes = parse_duration_min(limit)
        minutes = max_wall_time_min if minutes is None else min(minutes, max_wall_time_min)
        have, _ = counts.get(part, (0, minutes))
        counts[part] = (have + n, minutes)
    return [BackfillWindow(num_nodes=n, wall_time_min=m, queue=p) for p, (n, m) in counts.items()]


def is_gone_message(text: str) -> bool:
    low = text.lower()
    return "invalid job id" in low or "already completing or completed" in low or "job has already finished" in low


class SlurmScheduler(SchedulerAdapter):
    name = "slurm"
    default_template = "slurm.sh"
    submit_command = "sbatch"

    def directive_line(self, key: str, value: str) -> str:
        return f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}"

    def __init__(self, *, user: str | None = None, accounting: str = "auto", queue_flag: str = "--partition",
                 **kwargs) -> None:
        """accounting: where ended jobs are looked up: "auto" (sacct, then sacct -c),
        "sacct" (slurmdbd), "jobcomp" (sacct -c), "none". queue_flag: the sbatch flag the
        queue name goes to (--partition; --qos on QOS-scheduled machines like Perlmutter)."""
        super().__init__(**kwargs)
        if queue_flag not in ("--partition", "--qos"):
            raise ValueError(f"slurm queue_flag must be --partition or --qos, not {queue_flag!r}")
        self.queue_flag = queue_flag
        if accounting not in ("auto", "sacct", "jobcomp", "none"):
            raise ValueError(f"slurm accounting must be auto, sacct, jobcomp or none, not {accounting!r}")
        self.user = user or getpass.getuser()
        self.accounting = accounting
        self._dead_sources: set[bool] = set()

    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        argv = render_submit_argv(script_path, project=project, queue=queue, num_nodes=num_nodes,
                                  wall_time_min=wall_time_min, job_name=job_name, cwd=cwd,
                                  extra_flags=self.submit_flags, queue_flag=self.queue_flag)
        res = await self.run(argv, cwd=cwd)
        return submit_result(res, parse_submit_output)

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        if ids is not None and not ids:
            return {}
        res = await self.run(render_status_argv(ids, self.user))
        if res.ok:
            jobs = parse_squeue_output(res.stdout)
            if jobs is None:
                return None
        elif ids and is_gone_message(res.stderr):
            jobs = {}  # none of the requested ids is in the controller any more
        else:
            return None
        if not ids:
            return jobs
        result = {i: jobs[i] for i in ids if i in jobs}
        missing = [i for i in ids if i not in jobs]
        if missing:
            ended = await self._ended_jobs(missing)
            if ended is None:
                return None
            for jid in missing:
                result[jid] = ended.get(jid) or SchedulerJob(
                    scheduler_id=jid, state="finished",
                    message="left squeue; no accounting record, exit status unknown")
        return result

    async def _ended_jobs(self, ids: list[str]) -> dict[str, SchedulerJob] | None:
        """Records of ended jobs from accounting; {} when no source is configured; None when a
        source exists but failed now (try again)."""
        sources = {"auto": [False, True], "sacct": [False], "jobcomp": [True], "none": []}[self.accounting]
        found: dict[str, SchedulerJob] = {}
        for jobcomp in sources:
            if jobcomp in self._dead_sources:
                continue
            res = await self.run(render_sacct_argv(ids, jobcomp=jobcomp))
            if not res.ok:
                if self.accounting != "auto":
                    return None
                if "disabled" in res.stderr.lower():
                    self._dead_sources.add(jobcomp)  # configured off: not worth asking again
                continue  # try the next source
            parsed = parse_sacct_output(res.stdout)
            if parsed is None:
                return None
            # A job still listed as running in accounting but absent from squeue: trust
            # squeue's next answer rather than a stale record.
            found.update({k: v for k, v in parsed.items() if v.state in _ENDED})
            if all(i in found for i in ids):
                break
        return found

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        res = await self.run(render_find_argv(name, self.user))
        if not res.ok:
            return None
        live = parse_squeue_by_name(res.stdout, name)
        if live is None or live:
            return live
        # Not in the controller: it never reached Slurm, or it ended more than MinJobAge ago.
        # Only accounting can tell those apart; with none configured (or all disabled),
        # squeue's answer is all there is.
        sources = {"auto": [False, True], "sacct": [False], "jobcomp": [True], "none": []}[self.accounting]
        since = datetime.fromtimestamp(submitted_after - 3600) if submitted_after is not None else None
        answered = not [s for s in sources if s not in self._dead_sources]
        for jobcomp in sources:
            if jobcomp in self._dead_sources:
                continue
            res = await self.run(render_sacct_find_argv(name, self.user, jobcomp=jobcomp, since=since))
            if not res.ok:
                if "disabled" in res.stderr.lower():
                    self._dead_sources.add(jobcomp)
                    continue
                if self.accounting != "auto":
                    return None
                continue
            found = parse_sacct_by_name(res.stdout, name)
            if found is None:
                return None
            if found:
                return found
            answered = True
        # Every configured source either answered "none" or is switched off: definitive.
        # A source that failed for another reason leaves the answer open.
        return [] if answered or all(s in self._dead_sources for s in sources) else None

    async def cancel(self, scheduler_id: str) -> None:
        res = await self.run(render_cancel_argv(scheduler_id))
        if res.ok or is_gone_message(res.stderr):
            return
        raise SchedulerUnavailable(f"scancel {scheduler_id} failed: {res.describe()}")

    async def backfill_windows(self) -> list[BackfillWindow] | None:
        res = await self.run(render_backfill_argv())
        if not res.ok:
            return None
        return parse_sinfo_output(res.stdout, max_wall_time_min=self.backfill_max_wall_time_min)

