"""`local`: batch jobs are processes on this host (the embedded default, no scheduler needed).

Each job is run by a detached monitor (local_runner) in its own session; its record
(`<state_dir>/<id>.json`: pid, start, end, exit code) survives a site-daemon restart. Jobs
start at once (never "queued"); num_nodes > 1 is allowed and only recorded (every "node" is
this host); the wall time is enforced by the monitor. The script's output goes to
`<cwd>/local-<id>.out`. `start_delay_s` holds every job "queued" that long before its
script starts, so a demo can give local sites different queue delays. cancel = SIGTERM to the monitor, which kills the script's process
group (SIGKILL after a grace period); the adapter kills the group itself if the monitor is gone.

find_by_name reads the records (each holds its job_name). A record still being written, or
whose monitor has not recorded itself yet, makes the answer "unknown" while the submission
could still be under way; one that never got a monitor within the submit timeout never ran
and never will (its submitter died first): it is marked ended and not reported.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.processes import processes_naming

from .base import (
    CommandResult,
    SchedulerAdapter,
    SchedulerJob,
    State,
    SubmitError,
    run_command,
)
from .local_state import now_iso, process_identity, read_record, write_record

RUNNER_MODULE = "balsam_grpc.site.schedulers.local_runner"
# How long a live submitter may take from an id's placeholder to its record, and from the
# record to its runner's start: a submission left there longer was cut off.
SUBMIT_STEP_S = 5.0


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def job_from_record(rec: dict, *, monitor_alive: bool) -> SchedulerJob:
    """Pure: the job's status from its record and whether its monitor still runs."""
    sid = str(rec.get("scheduler_id", ""))
    end = _parse_time(rec.get("end_time"))
    exit_code = rec.get("exit_code") if isinstance(rec.get("exit_code"), int) else None
    reason = str(rec.get("end_reason") or "")
    state: State
    if end is not None:
        # A cancelled or timed-out pilot ended as asked: "finished", like Slurm's CA/TO.
        state = "finished" if exit_code == 0 or reason in ("cancelled", "wall time reached") else "failed"
        message = reason if reason != "exited" else (f"exit code {exit_code}" if exit_code else "")
    elif rec.get("pid") and monitor_alive and not rec.get("start_time"):
        state, message = "queued", "start delay"
    elif rec.get("pid") and monitor_alive:
        state, message = "running", ""
    elif rec.get("pid"):
        state, message, exit_code = "finished", "local monitor vanished; exit status unknown", None
    else:
        state, message = "unknown", "not started yet"
    return SchedulerJob(
        scheduler_id=sid, state=state, queue=str(rec.get("queue") or "local"),
        num_nodes=rec.get("num_nodes") if isinstance(rec.get("num_nodes"), int) else None,
        wall_time_min=rec.get("wall_time_min") if isinstance(rec.get("wall_time_min"), int) else None,
        submit_time=_parse_time(rec.get("submit_time")), start_time=_parse_time(rec.get("start_time")),
        end_time=end, exit_code=exit_code if end is not None else None, message=message,
        name=str(rec.get("job_name") or ""),
    )


def _monitor_alive(rec: dict) -> bool:
    """The record's monitor still runs: alive, and the same process (a pid reused by a
    later process is not ours). The monitor records its identity (its start in ticks since
    boot); the wall-clock start time, compared with a tolerance, serves only where there is
    none, since the wall clock can step between the record and the check."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        recorded = rec.get("identity")
        current = process_identity(pid) if recorded else None
        if current is not None:
            return current == recorded
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    start = _parse_time(rec.get("start_time"))
    return start is None or created <= start.timestamp() + 2.0


def _runner_running(state_file: Path) -> bool:
    """Whether a local_runner process for this job record runs (it is about to record its
    monitor)."""
    return bool(processes_naming(state_file, with_arg=RUNNER_MODULE))


def _group_alive(pgid: object) -> bool:
    if not isinstance(pgid, int) or pgid <= 0:
        return False
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, OSError):
            continue
    return False


class LocalScheduler(SchedulerAdapter):
    name = "local"
    default_template = "local.sh"

    def __init__(self, *, state_dir: str | Path | None = None, kill_grace_s: float = 5.0,
                 keep_ended_s: float = 86400.0, seconds_per_minute: float = 60.0, start_delay_s: float = 0.0,
                 **kwargs) -> None:
        """seconds_per_minute: how long a wall-time minute lasts; below 60 only for tests and
        demos that need a pilot to hit its wall time quickly. start_delay_s: how long each
        job waits "queued" before its script starts (an artificial queue delay)."""
        super().__init__(**kwargs)
        if state_dir is None:
            raise InvalidArgument("the local scheduler needs state_dir (where its job records live)",
                                  field="state_dir")
        self.state_dir = Path(state_dir)
        self.kill_grace_s = float(kill_grace_s)
        self.keep_ended_s = float(keep_ended_s)
        self.seconds_per_minute = float(seconds_per_minute)
        if start_delay_s < 0:
            raise ValueError(f"start_delay_s must be >= 0, got {start_delay_s}")
        self.start_delay_s = float(start_delay_s)

    def _path(self, scheduler_id: str) -> Path:
        if not scheduler_id.isdigit():
            raise InvalidArgument(f"not a local job id: {scheduler_id!r}", field="scheduler_id")
        return self.state_dir / f"{scheduler_id}.json"

    def _allocate_id(self) -> tuple[str, Path]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem) for p in self.state_dir.glob("*.json") if p.stem.isdigit()]
        n = max(existing, default=0) + 1
        while True:
            path = self.state_dir / f"{n}.json"
            try:  # O_EXCL: two submitters never get the same id
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return str(n), path
            except FileExistsError:
                n += 1

    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        script_path = Path(script_path).resolve()
        if not script_path.is_file():
            raise SubmitError(f"batch script {script_path} does not exist")
        if num_nodes < 1 or wall_time_min < 1:
            raise SubmitError(f"need num_nodes >= 1 and wall_time_min >= 1, got {num_nodes} and {wall_time_min}")
        script_path.chmod(script_path.stat().st_mode | 0o100)
        sid, path = self._allocate_id()
        cwd = Path(cwd).resolve()
        rec = {
            "scheduler_id": sid, "job_name": job_name, "project": project, "queue": queue or "local",
            "num_nodes": int(num_nodes), "wall_time_min": int(wall_time_min), "script": str(script_path),
            "cwd": str(cwd), "output": str(cwd / f"local-{sid}.out"), "submit_time": now_iso(),
            "kill_grace_s": self.kill_grace_s, "env": self.env or {},
            "wall_time_s": int(wall_time_min) * self.seconds_per_minute, "start_delay_s": self.start_delay_s,
        }
        write_record(path, rec)
        res: CommandResult = await run_command([sys.executable, "-m", RUNNER_MODULE, str(path)],
                                               timeout=self.timeout_s, cwd=cwd)
        if not res.ok:
            after = read_record(path) or {}
            raise SubmitError(str(after.get("end_reason") or res.describe()), argv=res.argv,
                              returncode=res.returncode)
        return sid

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        if not self.state_dir.is_dir():
            return []
        now = time.time()
        found: list[SchedulerJob] = []
        undecided = False
        for path in sorted(p for p in self.state_dir.glob("*.json") if p.stem.isdigit()):
            rec = read_record(path)
            if rec is None:  # the empty placeholder of an id being allocated, or damaged
                # A submitter fills its placeholder in one synchronous step: one left empty
                # longer than that belongs to a submitter that died.
                try:
                    undecided |= now - path.stat().st_mtime < SUBMIT_STEP_S
                except OSError:
                    continue
                continue
            if rec.get("job_name") != name:
                continue
            if not rec.get("pid"):
                # No monitor ever recorded itself: the job never ran, or its runner (which
                # records the monitor at once) is still on its way. Waiting out the whole
                # submit timeout (40 s) kept a restarted daemon from resubmitting a pilot
                # its killed predecessor never started.
                if rec.get("end_time") is not None:
                    continue  # ended without running: that submission failed, nothing to adopt
                submitted = _parse_time(rec.get("submit_time"))
                if submitted is None or now - submitted.timestamp() < SUBMIT_STEP_S or _runner_running(path):
                    undecided = True
                    continue
                rec.update(end_time=now_iso(), exit_code=None,
                           end_reason="never started: its submitter stopped before the job's monitor began")
                write_record(path, rec)
                continue
            found.append(self._job(rec))
        return None if undecided and not found else found

    def _job(self, rec: dict) -> SchedulerJob:
        alive = rec.get("end_time") is None and _monitor_alive(rec)
        if not alive and rec.get("end_time") is None and rec.get("scheduler_id"):
            # The monitor may have recorded its end and exited between our read and the
            # check: its record, read again, says how it ended.
            rec = read_record(self._path(str(rec["scheduler_id"]))) or rec
        return job_from_record(rec, monitor_alive=alive)

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        result: dict[str, SchedulerJob] = {}
        if ids is None:
            paths = [p for p in self.state_dir.glob("*.json") if p.stem.isdigit()] if self.state_dir.is_dir() else []
            cutoff = time.time() - self.keep_ended_s
            for p in paths:
                rec = read_record(p)
                if rec is None:
                    continue  # being created (empty placeholder) or damaged
                job = self._job(rec)
                if job.end_time is not None and job.end_time.timestamp() < cutoff:
                    p.unlink(missing_ok=True)  # old records go, like squeue forgetting ended jobs
                    continue
                result[job.scheduler_id] = job
            return result
        for sid in ids:
            if not sid.isdigit():
                result[sid] = SchedulerJob(scheduler_id=sid, state="unknown", message="not a local job id")
                continue
            path = self._path(sid)
            rec = read_record(path)
            if rec is None:
                if path.exists():
                    result[sid] = SchedulerJob(scheduler_id=sid, state="unknown", message="record unreadable")
                else:
                    result[sid] = SchedulerJob(scheduler_id=sid, state="finished",
                                               message="no record (already pruned); exit status unknown")
                continue
            result[sid] = self._job(rec)
        return result

    async def cancel(self, scheduler_id: str) -> None:
        path = self._path(scheduler_id)
        rec = read_record(path)
        if rec is None or rec.get("end_time") is not None:
            return  # unknown or already ended: nothing to do
        pid, pgid = rec.get("pid"), rec.get("pgid")
        if _monitor_alive(rec):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + self.kill_grace_s + 5.0
            while time.monotonic() < deadline and _monitor_alive(rec):
                await asyncio.sleep(0.05)
        # The monitor is gone: make sure the script's group is too, and that the end is recorded.
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if _monitor_alive(rec):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rec = read_record(path) or rec
        if rec.get("end_time") is None:
            rec.update(end_time=now_iso(), exit_code=None, end_reason="cancelled")
            write_record(path, rec)

    async def backfill_windows(self):
        return []


__all__ = ["LocalScheduler", "job_from_record"]
