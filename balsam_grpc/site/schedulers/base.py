"""What every scheduler adapter shares: result types, errors, the one subprocess call, and
small pure parsing helpers (durations, timestamps).

An adapter is pure `render_*` (argv, batch script) and `parse_*` (command output) functions
around `run_command`. Parsers never raise on what a scheduler prints: output they cannot
read means "unknown, try again" (None), because a wrong answer could end a pilot's record
while it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

import structlog

from balsam_grpc.core.errors import FailedPrecondition, InvalidArgument, Unavailable

from .template import render_template

log = structlog.get_logger("balsam_grpc.site.schedulers")

State = Literal["queued", "running", "finished", "failed", "unknown"]
STATES: tuple[State, ...] = ("queued", "running", "finished", "failed", "unknown")

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SchedulerJob:
    """One batch job as the scheduler reports it.

    state: queued | running | finished (ended normally, by wall time or by cancellation) |
    failed (ended abnormally: node failure, out of memory, non-zero exit...) | unknown.
    Times are timezone-aware (UTC) or None when the scheduler did not report them.
    """

    scheduler_id: str
    state: State
    queue: str = ""
    num_nodes: int | None = None
    wall_time_min: int | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    exit_code: int | None = None
    message: str = ""
    # The job's name where the scheduler's output carries it (find_by_name needs it).
    name: str = ""


@dataclass(frozen=True)
class BackfillWindow:
    """Nodes that are idle now and for how long a job could use them."""

    num_nodes: int
    wall_time_min: int
    queue: str = ""


class SubmitError(FailedPrecondition):
    """The scheduler refused a submission; `message` is what it said (for the batch job's
    status_info)."""

    default_reason = "SUBMIT_FAILED"

    def __init__(self, message: str, *, argv: list[str] | None = None, returncode: int | None = None,
                 maybe_submitted: bool = False) -> None:
        super().__init__(message or "submission failed with no message from the scheduler")
        self.argv = list(argv or [])
        self.returncode = returncode
        # True when the submit command ran but its answer never came (timeout): the
        # scheduler may hold the job anyway, so the caller looks it up by name.
        self.maybe_submitted = maybe_submitted


class SchedulerUnavailable(Unavailable):
    """A scheduler command could not answer now (timeout, not installed, controller down).
    Retry later; nothing is known about the job."""

    default_reason = "SCHEDULER_UNAVAILABLE"


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int | None  # None: timed out or could not start
    stdout: str
    stderr: str
    timed_out: bool = False  # started but killed at the timeout (it may have done its work)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        text = (self.stderr.strip() or self.stdout.strip())[-2000:]
        status = "timed out or failed to start" if self.returncode is None else f"exit {self.returncode}"
        return f"{self.argv[0]} {status}: {text}" if text else f"{self.argv[0]} {status}"


async def run_command(argv: list[str], *, timeout: float = DEFAULT_TIMEOUT_S, cwd: Path | None = None,
                      env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
    """The one subprocess call of every adapter. Never raises for the command's own failure:
    a missing binary, a non-zero exit and a timeout all come back as a CommandResult."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C aimed at the daemon does not reach a half-done qsub.
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("scheduler_command_failed_to_start", argv=argv, error=str(exc))
        return CommandResult(argv, None, "", f"cannot run {argv[0]}: {exc}")
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        # The whole group (its own session): a child still holding the pipes would keep us waiting.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await proc.wait()
        log.warning("scheduler_command_timeout", argv=argv, timeout_s=timeout)
        return CommandResult(argv, None, "", f"{argv[0]} did not answer within {timeout:g} s", timed_out=True)
    result = CommandResult(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    log.debug("scheduler_command", argv=argv, returncode=result.returncode)
    return result


class SchedulerAdapter:
    """Base of every adapter: the async methods the site daemon calls. Subclasses provide the
    pure render_*/parse_* functions and override the methods whose flow differs."""

    name: ClassVar[str] = ""
    default_template: ClassVar[str] = ""  # file name under templates/
    # The command that submits (its argv holds the script path): a daemon restarted after a
    # crash waits for one still running before it looks the job up by name.
    submit_command: ClassVar[str] = ""

    def __init__(self, *, bin_dir: str | None = None, submit_flags: list[str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, env: dict[str, str] | None = None,
                 backfill_max_wall_time_min: int = 1440) -> None:
        # bin_dir: where the scheduler's commands live when they are not on PATH.
        self.bin_dir = bin_dir
        self.submit_flags = [str(f) for f in (submit_flags or [])]
        self.timeout_s = float(timeout_s)
        self.env = dict(env) if env else None
        self.backfill_max_wall_time_min = int(backfill_max_wall_time_min)

    # --- the one subprocess call --------------------------------------------------------
    def exe(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name

    async def run(self, argv: list[str], *, cwd: Path | None = None) -> CommandResult:
        env = {**os.environ, **self.env} if self.env else None
        return await run_command([self.exe(argv[0]), *argv[1:]], timeout=self.timeout_s, cwd=cwd, env=env)

    # --- script -------------------------------------------------------------------------
    def render_script(self, template_text: str, context: dict) -> str:
        return render_script(template_text, context)

    def default_template_text(self) -> str:
        return read_template(self.default_template)

    def render_directives(self, params: dict[str, str]) -> str:
        """A batch job's optional scheduler parameters as directive lines for the template's
        {{ sched_directives }}. Keys and values are checked: a newline or a shell
        metacharacter in them could smuggle commands into the script."""
        lines = []
        for key, value in sorted(params.items()):
            key, value = str(key), str(value)
            if not _DIRECTIVE_KEY.match(key):
                raise InvalidArgument(f"scheduler parameter name {key!r} must be letters, digits, '-' or '_'",
                                      field="optional_params")
            if not _DIRECTIVE_VALUE.match(value):
                raise InvalidArgument(f"scheduler parameter {key}={value!r} holds characters not allowed in a "
                                      "directive", field="optional_params")
            line = self.directive_line(key, value)
            if line:
                lines.append(line)
        return "\n".join(lines)

    def directive_line(self, key: str, value: str) -> str:
        return ""

    # --- interface ----------------------------------------------------------------------
    async def submit(self, script_path: Path, *, project: str, queue: str, num_nodes: int,
                     wall_time_min: int, job_name: str, cwd: Path) -> str:
        raise NotImplementedError

    async def statuses(self, ids: list[str] | None = None) -> dict[str, SchedulerJob] | None:
        raise NotImplementedError

    async def cancel(self, scheduler_id: str) -> None:
        raise NotImplementedError

    async def find_by_name(self, name: str, *, submitted_after: float | None = None) -> list[SchedulerJob] | None:
        """Every job of this user called exactly `name` the scheduler knows, live or ended
        (its history included, where it keeps one); [] when it definitively knows none;
        None when it cannot say now (try again). `submitted_after` (epoch seconds) bounds
        how far back history is searched. The site daemon uses it after a crash between
        the scheduler accepting a pilot and the journal recording its id."""
        raise NotImplementedError

    async def backfill_windows(self) -> list[BackfillWindow] | None:
        return []


def submit_result(res: CommandResult, parse: Callable[[str], str | None]) -> str:
    """Shared by adapters: the id from a successful submit, else SubmitError with the
    scheduler's own words. A timeout is a SubmitError too; its message warns that the job may
    exist anyway, for a human to check (retrying could queue it twice)."""
    if res.returncode is None:
        if res.timed_out:
            raise SubmitError(res.describe() + " (the job may still have been queued)", argv=res.argv,
                              returncode=None, maybe_submitted=True)
        raise SubmitError(res.describe(), argv=res.argv, returncode=None)
    if not res.ok:
        raise SubmitError(res.stderr.strip() or res.stdout.strip() or res.describe(), argv=res.argv,
                          returncode=res.returncode)
    sid = parse(res.stdout)
    if sid is None:
        raise SubmitError(f"{res.argv[0]} succeeded but printed no job id: {res.stdout.strip()[:500]!r}",
                          argv=res.argv, returncode=res.returncode)
    return sid


# --- pilot names ------------------------------------------------------------------------------
PILOT_NAME_MAX = 64
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def pilot_job_name(site_name: str, batch_job_id: int) -> str:
    """The scheduler job name of a pilot: "balsam-<site>-<batch job id>", the same on every
    attempt, so a daemon that crashed mid-submit can find the job by name. Characters a
    scheduler could misread (spaces, LSF's array brackets, shell metacharacters) become
    "_"; a long site name is cut, never the id (ids must stay distinct), and the result is
    at most 64 characters, within every scheduler's limit."""
    suffix = f"-{int(batch_job_id)}"
    site = _NAME_UNSAFE.sub("_", site_name).strip("_") or "site"
    return "balsam-" + site[:PILOT_NAME_MAX - len("balsam-") - len(suffix)] + suffix


def adoption_order(jobs: list[SchedulerJob]) -> list[SchedulerJob]:
    """Found jobs with live ones first, then by submission (oldest first): the one to adopt
    leads. Ids are compared as numbers where they are numbers."""
    def key(job: SchedulerJob) -> tuple:
        head = job.scheduler_id.split(".")[0]
        return (job.state in ("finished", "failed"), int(head) if head.isdigit() else float("inf"),
                job.scheduler_id)
    return sorted(jobs, key=key)


def submitted_since(jobs: list[SchedulerJob], since: float | None, slack_s: float = 300.0) -> list[SchedulerJob]:
    """Drop jobs the scheduler says were submitted well before `since` (epoch seconds): a
    same-named job from before the submit intent (another server's site of the same name)
    is not ours. Jobs without a submit time are kept."""
    if since is None:
        return list(jobs)
    return [j for j in jobs if j.submit_time is None or j.submit_time.timestamp() >= since - slack_s]


# --- scripts ----------------------------------------------------------------------------------
TEMPLATES_DIR = Path(__file__).with_name("templates")


def read_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text()


def render_script(template_text: str, context: dict) -> str:
    """The batch script: the template with the context plus derived values (wall time as
    HH:MM:SS, `env_exports` lines) so templates need no arithmetic."""
    ctx = dict(context)
    wall = ctx.get("wall_time_min")
    if wall is not None and "wall_time_hms" not in ctx:
        ctx["wall_time_hms"] = format_hms(int(wall))
    env = ctx.get("env") or {}
    if "env_exports" not in ctx:
        ctx["env_exports"] = "\n".join(f"export {k}={shell_quote(str(v))}" for k, v in sorted(env.items()))
    return render_template(template_text, ctx)


_DIRECTIVE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_DIRECTIVE_VALUE = re.compile(r"^[A-Za-z0-9_@%+=:,./ -]*$")
_SAFE_SHELL = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def shell_quote(value: str) -> str:
    if value and _SAFE_SHELL.match(value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def format_hms(minutes: int) -> str:
    minutes = max(0, int(minutes))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


# --- pure parsing helpers ---------------------------------------------------------------------
def parse_duration_min(text: str | None) -> int | None:
    """Minutes (rounded up) from Slurm's duration shapes: "D-HH:MM:SS", "D-HH:MM", "D-HH",
    "HH:MM:SS", "MM:SS", "MM". None for UNLIMITED, N/A, or anything else."""
    if not text:
        return None
    text = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    try:
        days = int(m.group(1) or 0)
        parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
    except ValueError:  # more digits than int() converts (4300): garbage, not a duration
        return None
    if days and len(parts) == 1:  # "D-HH"
        h, mi, s = parts[0], 0, 0
    elif len(parts) == 3:
        h, mi, s = parts
    elif len(parts) == 2:
        h, mi, s = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, mi, s = 0, parts[0], 0
    total_s = ((days * 24 + h) * 60 + mi) * 60 + s
    return -(-total_s // 60)  # integer ceil: total_s / 60 overflows a float for huge values


def parse_hms_min(text: str | None) -> int | None:
    """Minutes from "HH:MM:SS" or "HH:MM" (PBS/Cobalt wall times, hours first)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+):(\d{1,2})(?::(\d{1,2}))?\s*", text)
    if not m:
        return None
    try:
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    except ValueError:  # more digits than int() converts (4300)
        return None
    return -(-(h * 3600 + mi * 60 + s) // 60)


def local_to_utc(naive: datetime) -> datetime:
    """Schedulers print local wall-clock times; store them as UTC."""
    return naive.astimezone(UTC)


def parse_iso_local(text: str | None) -> datetime | None:
    """Slurm-style "2024-05-01T12:00:00" (local time); None for N/A, Unknown, None, garbage."""
    if not text:
        return None
    try:
        return local_to_utc(datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError, OSError):
        return None


def to_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*", value)
        if m:
            try:
                return int(m.group(1))
            except ValueError:  # more digits than int() converts (4300)
                return None
    return None


def join_messages(*parts: str | None) -> str:
    return "; ".join(p.strip() for p in parts if p and p.strip())


__all__ = [
    "STATES",
    "BackfillWindow",
    "CommandResult",
    "SchedulerAdapter",
    "SchedulerJob",
    "SchedulerUnavailable",
    "State",
    "SubmitError",
    "adoption_order",
    "pilot_job_name",
    "run_command",
    "submit_result",
    "submitted_since",
]
