"""Start, watch, time out and kill job processes on this node.

Each job runs in its own session (process group), so a kill reaches everything it
started, and the group is handed to a watchdog that kills it if this process dies
(reaper.py). stdout and stderr go to `<workdir>/job.out`. `poll()` reaps finished
processes, enforces time limits and escalates SIGTERM to SIGKILL; it never blocks.

A job sees none of the launcher's credentials (core/jobenv.py): it gets its run's own
token in its spec's environment. Its workdir must resolve inside the site's data folder
(a symlink there cannot send it elsewhere) and is created owner-only, like job.out and
the files written for it (core/confined.py).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from balsam_grpc.core.confined import open_dir_inside, open_private, write_private
from balsam_grpc.core.jobenv import job_safe
from balsam_grpc.launcher.launch_commands import _ranges
from balsam_grpc.launcher.process_spec import ProcessSpec
from balsam_grpc.launcher.reaper import Reaper
from balsam_grpc.launcher.spawn import Child, environment_entries, spawn

log = structlog.get_logger("balsam.launcher")
KILL_GRACE_S = 0.5  # SIGTERM first; SIGKILL after this (a kill must land within a second)
TAIL_BYTES = 8192
TAIL_LINES = 20
# Variables of the launcher's own MPI job: a job must not inherit them, or an MPI program
# it starts would try to join the launcher's MPI world.
SCRUB_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess", "OMPI_UNIVERSE",
                  "MPI_LOCAL", "MPIR_CVAR_CH3_INTERFACE_HOSTNAME", "ALPS_APP_", "PALS_")
_AFFINITY = hasattr(os, "sched_setaffinity")  # Linux
# Spawner threads kept, one per CPU set jobs were bound to (the least recently used goes):
# as many as a node's slot layouts need, bounded when jobs of many sizes come and go.
MAX_SPAWNERS = 64
_WAITID = hasattr(os, "waitid")
_PROC_FD = os.path.isdir("/proc/self/fd")
# A job that follows another (start(after=...)) waits on a descriptor of that one's
# process (Linux 5.3): readable when it ends, reaped or not, and never another process.
_PIDFD = hasattr(os, "pidfd_open") and hasattr(select, "poll")
# How often a follower waiting for its predecessor looks whether it was killed meanwhile.
FOLLOW_CHECK_MS = 50
# The outcome of a follower taken back before it started (ProcessRunner.withdraw).
WITHDRAWN = "withdrawn"


def _pidfd_works() -> bool:
    if not _PIDFD:
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # ENOSYS: an older kernel
        return False
    return True


class _Cancelled(Exception):
    """A follower killed before its predecessor ended: it is not started."""


def job_base_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment without its MPI job's variables and its credentials."""
    environ = job_safe(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if not k.startswith(SCRUB_PREFIXES)}


def _checked_folder(dir_fd: int, path: str) -> str:
    """Where the child is to chdir: the folder open as `dir_fd` (checked to be inside the
    data folder), by its descriptor, which the child still holds when it changes folder;
    by `path` only where /proc is missing. A symlink put in the path's place after the
    check would otherwise take the job elsewhere."""
    return f"/proc/self/fd/{dir_fd}" if _PROC_FD else path


def read_tail(path: Path | str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class _BoundSpawner:
    """A thread bound to one CPU set (or to none: the launcher's own) that starts the jobs
    bound to it: a child inherits the CPU mask of the thread that forks it. Binding the
    launcher's own thread for each start (and back after) made the kernel move it onto the
    job's CPUs first, and it waited there, holding the GIL, behind what ran on them: 27-57 %
    of the launcher's time with 2 slots of one CPU each. This thread sits on its CPUs already
    and sleeps between starts.

    `run` waits for the start; `submit` does not: a start lasts until the child has exec'd
    (vfork), 0.2-0.7 ms on a busy 2-CPU node, during which the launcher's loop can reap and
    start other jobs and answer its session."""

    def __init__(self, cpus: tuple[int, ...], follows: bool = False) -> None:
        self.cpus = cpus
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._unbound: tuple[int, str] | None = None  # why this thread could not bind
        # Bound to CPUs no two running jobs share, a thread has started at most one job that
        # still runs: the last (its id and a descriptor of its process), which a follower
        # waits on. A pidfd never names another process, reaped or not.
        self._follows = follows and bool(cpus)
        self._last: tuple[int, int] | None = None
        name = f"spawn on CPUs {_ranges(cpus)}" if cpus else "spawn"
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)  # this thread only
            except OSError as exc:
                self._unbound = (exc.errno, f"cannot bind to CPUs {_ranges(self.cpus)}: {exc.strerror}")
        try:
            while (task := self._tasks.get()) is not None:
                try:
                    if self._unbound is not None:
                        raise OSError(*self._unbound)
                    if task.after is not None:
                        self._wait_for(task.after, task.cancelled)
                    child, error = task.call(), None
                    if self._follows and task.job_id is not None:
                        self._remember(task.job_id, child.pid)
                except BaseException as exc:  # handed to `done`
                    child, error = None, exc
                try:
                    task.done(child, error)
                except Exception as exc:  # the thread must go on serving the other starts
                    log.error("could not hand over a started job", error=str(exc), kind=type(exc).__name__)
        finally:
            if self._last is not None:
                os.close(self._last[1])

    def _remember(self, job_id: int, pid: int) -> None:
        """Before the hand-over (nothing reaps the child until then): its pid is its own."""
        if self._last is not None:
            os.close(self._last[1])
            self._last = None
        try:
            self._last = (job_id, os.pidfd_open(pid))
        except OSError:  # out of descriptors: a follower cannot start (see _wait_for)
            self._last = (job_id, -1)

    def _wait_for(self, job_id: int, cancelled: Callable[[], bool]) -> None:
        """Until the job started last here, if it is `job_id`, has ended (its start may have
        failed: nothing to wait for); _Cancelled if `cancelled()` turns true first."""
        if self._last is not None and self._last[0] == job_id:
            if self._last[1] < 0:  # never two jobs on these CPUs
                raise OSError(errno.EMFILE, f"cannot wait for job {job_id} to end")
            poller = select.poll()
            poller.register(self._last[1], select.POLLIN)
            while not poller.poll(FOLLOW_CHECK_MS):
                if cancelled():
                    break
        if cancelled():
            raise _Cancelled("killed before the job it was to follow ended: never started")

    def submit(self, call: Callable[[], Child | subprocess.Popen],
               done: Callable[[Child | None, BaseException | None], None], job_id: int | None = None,
               after: int | None = None, cancelled: Callable[[], bool] = lambda: False) -> None:
        """`call()` on this thread, then `done(child, None)` or `done(None, exception)` there;
        after the job `after` (started last here) has ended, if given."""
        self._tasks.put(_Task(call, done, job_id, after, cancelled))

    def run(self, call: Callable[[], Child | subprocess.Popen]) -> Child | subprocess.Popen:
        """`call()` on this thread, the caller waiting (without the GIL) for its outcome."""
        out: queue.SimpleQueue[tuple[Child | None, BaseException | None]] = queue.SimpleQueue()
        self.submit(call, lambda child, error: out.put((child, error)))
        child, exc = out.get()
        if exc is not None:
            raise exc
        assert child is not None
        return child

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, wait: bool = True) -> None:
        """After the starts submitted so far (the caller waits for them, or not)."""
        self._tasks.put(None)
        if wait:
            self._thread.join()


@dataclass
class _Task:
    call: Callable[[], Child | subprocess.Popen]
    done: Callable[[Child | None, BaseException | None], None]
    job_id: int | None
    after: int | None  # the job to wait for
    cancelled: Callable[[], bool]


@dataclass
class ProcessResult:
    """How a job's process ended."""

    job_id: int
    return_code: int | None
    # "exit" (ended on its own), "timeout" (its wall time ran out), "killed" (kill() was
    # called with another reason, e.g. the server's KillJobs), "spawn_error".
    outcome: str
    elapsed_s: float
    tail: str = ""
    result: dict | None = None  # a Python-function app's outcome file
    message: str = ""


@dataclass
class _Running:
    spec: ProcessSpec
    proc: Child
    start: float
    deadline: float | None
    kill_reason: str = ""
    kill_message: str = ""
    term_time: float | None = None
    killed_hard: bool = False
    out_path: str = ""


@dataclass
class _Starting:
    """A job whose process a spawner thread is starting (background starts), or will start
    when the job it follows ends (start and deadline are set then)."""

    spec: ProcessSpec
    start: float
    deadline: float | None
    out_path: str
    kill_reason: str = ""
    kill_message: str = ""
    follows: bool = False


class ProcessRunner:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.base_env = job_base_environment(environ)
        self._base_env = environment_entries(self.base_env)
        self.running: dict[int, _Running] = {}
        self._by_pid: dict[int, int] = {}  # pid -> job id, of what runs
        self._timed: set[int] = set()  # running jobs with a deadline or a kill under way
        self.host_cpus = os.cpu_count() or 1
        # Set in the launcher's own thread by whoever started it (taskset, a batch system):
        # a job bound to exactly these CPUs inherits them without a spawner thread.
        self._own_cpus = frozenset(os.sched_getaffinity(0)) if _AFFINITY else frozenset()
        self._spawners: OrderedDict[tuple[int, ...], _BoundSpawner] = OrderedDict()
        self.reaper = Reaper()
        self.lingering: set[int] = set()  # groups whose leader ended (poll forgets them when empty)
        self._null_fd = -1
        # Background starts (start_in_background): jobs being started, what the spawner
        # threads report (job id, child or None, why not), the jobs killed meanwhile.
        self._notify: Callable[[], None] | None = None
        self.starting: dict[int, _Starting] = {}
        self._started: deque[tuple[int, Child | None, str]] = deque()
        self._kill_asked: set[int] = set()
        self._awaited = False  # a child ended that may be a start not handed over yet
        self._pidfd = _pidfd_works()
        self._retired: list[_BoundSpawner] = []  # spawner threads let go, joined at shutdown

    def start_in_background(self, notify: Callable[[], None]) -> None:
        """From now on start() returns before the job's process exists: a spawner thread
        starts it and poll() takes it in (or reports its spawn_error). `notify` is called,
        on that thread, when poll() has something to report that no SIGCHLD would bring
        promptly (a failed start, a job killed while it was starting): it must wake the
        caller's loop, thread-safely. The watchdog learns of the job on that thread, as
        soon as it exists."""
        self._notify = notify

    def __len__(self) -> int:
        return len(self.running) + len(self.starting)

    def can_follow(self, job_id: int) -> bool:
        """Whether a job can be started to follow this one (start(after=job_id)): it runs or
        is being started here, is not being killed, and is bound to CPUs (its spawner thread
        then serves them alone: a follower's wait holds up no other job's start)."""
        if not self._pidfd or self._notify is None:
            return False
        job = self.running.get(job_id) or self.starting.get(job_id)
        if job is None or job.kill_reason:
            return False
        bind = self._binding(job.spec.cpu_ids)
        return bool(bind) and bind in self._spawners  # the thread that started it: it waits on it

    def _binding(self, cpu_ids: list[int]) -> tuple[int, ...]:
        """The CPUs a directly started job is bound to: none when the ids cover the whole host,
        name CPUs this host lacks (a preset larger than the host) or are the launcher's own."""
        if (not cpu_ids or not _AFFINITY or max(cpu_ids) >= self.host_cpus or len(cpu_ids) >= self.host_cpus
                or frozenset(cpu_ids) == self._own_cpus):
            return ()
        return tuple(sorted(set(cpu_ids)))

    def _spawner(self, cpus: tuple[int, ...]) -> _BoundSpawner:
        spawner = self._spawners.get(cpus)
        if spawner is None:
            if len(self._spawners) >= MAX_SPAWNERS:
                # Not waited for: a follower may wait there for the job it follows.
                retired = self._spawners.popitem(last=False)[1]
                retired.close(wait=False)
                self._retired = [r for r in self._retired if r.alive()]
                self._retired.append(retired)
            spawner = self._spawners[cpus] = _BoundSpawner(cpus, follows=self._pidfd)
        else:
            self._spawners.move_to_end(cpus)
        return spawner

    def start(self, spec: ProcessSpec, now: float | None = None, after: int | None = None) -> ProcessResult | None:
        """Start the job; a ProcessResult (outcome spawn_error) when it could not start. In
        the background (start_in_background) a failure of the start itself comes from poll().

        `after`: a running job (can_follow) on the CPUs this one is bound to: everything is
        made ready now and the spawner thread starts the job the moment that one ends,
        without a turn of the caller's loop (which then reaps the first and reports both).
        Its wall time counts from then; killed before, it never starts."""
        now = time.monotonic() if now is None else now
        follow = (self.running.get(after) or self.starting.get(after)) if after is not None else None
        if after is not None and not (follow is not None and self.can_follow(after)
                                      and self._binding(spec.cpu_ids) == self._binding(follow.spec.cpu_ids)):
            raise ValueError(f"job {spec.job_id} cannot follow job {after}")
        try:
            dir_fd, workdir = open_dir_inside(spec.cwd, spec.root or "/", what="workdir")
        except (ValueError, OSError) as exc:  # PathEscape is a ValueError, as a NUL in the path is
            # Nothing is written: the path may lead anywhere.
            msg = f"refused to run job {spec.job_id}: {exc}"
            return ProcessResult(spec.job_id, None, "spawn_error", 0.0, tail=msg, message=msg)
        out_path = os.path.join(workdir, spec.out_name)
        deadline = now + spec.timeout_s if spec.timeout_s else None
        out = -1
        try:
            try:
                for name, text in spec.files.items():
                    write_private(name, text.encode(), dir_fd=dir_fd)
                if spec.result_path:
                    Path(spec.result_path).unlink(missing_ok=True)
                env = self._base_env.copy()
                env.update(environment_entries(spec.env))
                out = open_private(spec.out_name, append=True, dir_fd=dir_fd)
                bind = self._binding(spec.cpu_ids)
                cwd, stdin = _checked_folder(dir_fd, workdir), self._devnull()
                if self._notify is not None:
                    spawner = self._spawner(bind)
                    # The spawner thread owns the descriptors from here on.
                    starting = self.starting[spec.job_id] = _Starting(spec, now, deadline, out_path)
                    fds, dir_fd, out = (dir_fd, out), -1, -1
                    call = lambda: spawn(spec.argv, cwd=cwd, env=env, stdin=stdin, stdout=fds[1])  # noqa: E731
                    if after is not None:
                        starting.deadline, starting.follows = None, True
                        call = self._following(starting, call)
                    spawner.submit(call, lambda child, error: self._spawned(spec, workdir, fds, child, error),
                                   job_id=spec.job_id, after=after, cancelled=lambda: spec.job_id in self._kill_asked)
                    return None
                if bind:
                    # Bound as taskset would bind it, without a second program to exec
                    # for every job.
                    proc = self._spawner(bind).run(
                        lambda: spawn(spec.argv, cwd=cwd, env=env, stdin=stdin, stdout=out))
                else:
                    proc = spawn(spec.argv, cwd=cwd, env=env, stdin=stdin, stdout=out)
            except (ValueError, OSError) as exc:  # ValueError: PathEscape, or what exec cannot take (`=` in a name, NUL)
                msg = self._could_not_start(spec, workdir, dir_fd, exc)
                return ProcessResult(spec.job_id, None, "spawn_error", 0.0, tail=msg, message=msg)
        finally:
            for fd in (out, dir_fd):
                if fd >= 0:
                    os.close(fd)
        self.reaper.watch(proc.pid)  # its own session: the group id is its pid
        self._running(spec.job_id, _Running(spec, proc, now, deadline, out_path=out_path))
        return None

    @staticmethod
    def _following(starting: _Starting, call: Callable[[], Child | subprocess.Popen]
                   ) -> Callable[[], Child | subprocess.Popen]:
        """A follower's start, on the spawner thread once the job it follows ended: its wall
        time counts from here."""
        def start() -> Child | subprocess.Popen:
            starting.start = time.monotonic()
            if starting.spec.timeout_s:
                starting.deadline = starting.start + starting.spec.timeout_s
            return call()
        return start

    @staticmethod
    def _could_not_start(spec: ProcessSpec, workdir: str, dir_fd: int, exc: BaseException) -> str:
        """The message of a failed start, also written to the job's output."""
        msg = f"could not start {spec.argv[0]!r} in {workdir}: {exc}"
        try:
            with os.fdopen(open_private(spec.out_name, append=True, dir_fd=dir_fd), "a") as fh:
                fh.write(msg + "\n")
        except OSError:
            pass
        return msg

    def _spawned(self, spec: ProcessSpec, workdir: str, fds: tuple[int, int], child: Child | None,
                 error: BaseException | None) -> None:
        """On the spawner thread, once a background start is over: the watchdog learns of the
        child at once (a launcher that dies now still takes it along); poll() takes it in."""
        msg = ""
        try:
            if child is not None:
                self.reaper.watch(child.pid)
            elif isinstance(error, _Cancelled):
                msg = str(error)  # nothing ran: nothing goes to its output
            else:
                msg = self._could_not_start(spec, workdir, fds[0], error or OSError("no child"))
        finally:
            for fd in fds:
                os.close(fd)
        self._started.append((spec.job_id, child, msg))
        # A failed start's child was reaped here (no SIGCHLD reaches poll() for it), a job
        # killed while starting is signalled by poll(), and a job may have ended before this
        # hand-over (poll() saw a child it did not know): wake the loop for them. kill() and
        # poll() mark what they wait for before they look here (or wake the loop themselves):
        # one of the two wakes follows this append.
        if child is None or spec.job_id in self._kill_asked or self._awaited:
            self._wake_owner()

    def _wake_owner(self) -> None:
        notify = self._notify
        if notify is not None:
            try:
                notify()
            except RuntimeError:  # its loop is closed: nobody is left to tell
                pass

    def _running(self, job_id: int, run: _Running) -> None:
        self.running[job_id] = run
        self._by_pid[run.proc.pid] = job_id
        if run.deadline is not None:
            self._timed.add(job_id)

    def _take_started(self, done: list[ProcessResult], now: float) -> None:
        """Jobs the spawner threads started (or failed to) since the last poll."""
        self._awaited = False
        while self._started:
            job_id, child, msg = self._started.popleft()
            self._kill_asked.discard(job_id)
            starting = self.starting.pop(job_id)
            if child is None:
                # Killed meanwhile (the server's kill, a lost lease, the launcher stopping):
                # it ends as killed, as it would have had it started (a spawn_error would
                # report RUN_ERROR for a job this launcher no longer holds).
                outcome = starting.kill_reason or "spawn_error"
                done.append(ProcessResult(job_id, None, outcome, 0.0, tail=msg,
                                          message=starting.kill_message if starting.kill_reason else msg))
                continue
            run = _Running(starting.spec, child, starting.start, starting.deadline, out_path=starting.out_path)
            self._running(job_id, run)
            if starting.kill_reason and starting.kill_reason != WITHDRAWN:  # withdrawn too late: it runs
                self.kill(job_id, starting.kill_reason, starting.kill_message, now=now)

    def _devnull(self) -> int:
        """One /dev/null for every job's stdin (not inherited: the child gets it as fd 0)."""
        if self._null_fd < 0:
            self._null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        return self._null_fd

    def withdraw(self, job_id: int) -> bool:
        """Take back a follower whose predecessor still runs: unless its start began
        meanwhile, it never starts and poll() reports it with outcome WITHDRAWN (nothing
        written to its output), for the caller to start it elsewhere; else it runs as any job.
        False when `job_id` is not a follower waiting here."""
        starting = self.starting.get(job_id)
        if starting is None or not starting.follows or starting.kill_reason:
            return False
        starting.kill_reason = WITHDRAWN
        self._kill_asked.add(job_id)  # the spawner thread's wait looks at it
        return True

    def kill(self, job_id: int, reason: str = "killed", message: str = "", now: float | None = None) -> bool:
        """SIGTERM the job's process group (SIGKILL follows in poll). False if not running here."""
        run = self.running.get(job_id)
        if run is None:
            starting = self.starting.get(job_id)
            if starting is None:
                return False
            if starting.kill_reason in ("", WITHDRAWN):  # signalled once poll() takes it in
                starting.kill_reason, starting.kill_message = reason, message
                self._kill_asked.add(job_id)  # before the wake: see _spawned
                self._wake_owner()
            return True
        if not run.kill_reason:
            run.kill_reason, run.kill_message = reason, message
            run.term_time = time.monotonic() if now is None else now
            self._timed.add(job_id)
            self._signal(run, signal.SIGTERM)
        return True

    @staticmethod
    def _signal(run: _Running, sig: int) -> None:
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group leader is gone and the pgid reused: signal the pid only
            try:
                run.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def poll(self, now: float | None = None) -> list[ProcessResult]:
        now = time.monotonic() if now is None else now
        done: list[ProcessResult] = []
        if self._started:
            self._take_started(done, now)  # before reaping: a job may have ended already
        self._forget_ended_groups()
        if not self._reap_ended(done, now):
            for job_id, run in list(self.running.items()):
                rc = run.proc.poll()
                if rc is not None:
                    done.append(self._ended(job_id, run, rc, now))
            if self.starting:
                # A child that is no running job's ended: perhaps one whose start is being
                # handed over (its SIGCHLD came first). The hand-over wakes the loop.
                self._awaited = True
                if self._started:  # handed over meanwhile
                    self._wake_owner()
        for job_id in list(self._timed):
            run = self.running[job_id]
            if run.deadline is not None and now >= run.deadline and not run.kill_reason:
                self.kill(job_id, "timeout", f"exceeded its wall time of {run.spec.timeout_s:g} s", now=now)
            elif run.term_time is not None and not run.killed_hard and now - run.term_time >= KILL_GRACE_S:
                run.killed_hard = True
                self._signal(run, signal.SIGKILL)
        return done

    def _reap_ended(self, done: list[ProcessResult], now: float) -> bool:
        """Reap the jobs whose process ended, asking the kernel which child ended (waitid
        without reaping) instead of a waitpid per running job at every wake-up: a node with
        a hundred jobs running would make a hundred system calls for each that ends. False
        when some other child ended (the watchdog): the caller then asks of every job."""
        if not _WAITID:
            return False
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no child at all
                return True
            if info is None:  # none ended
                return True
            job_id = self._by_pid.get(info.si_pid)
            if job_id is None:
                return False
            run = self.running[job_id]
            rc = run.proc.poll()
            if rc is None:
                return False
            done.append(self._ended(job_id, run, rc, now))

    def _ended(self, job_id: int, run: _Running, rc: int, now: float) -> ProcessResult:
        if run.kill_reason:
            # Whatever the group leader left behind goes too.
            self._signal(run, signal.SIGKILL)
        self.lingering.add(run.proc.pid)
        del self.running[job_id]
        del self._by_pid[run.proc.pid]
        self._timed.discard(job_id)
        return self._result(run, rc, now)

    def _forget_ended_groups(self) -> None:
        """The watchdog keeps a finished job's group until its last process is gone (what
        the job left running dies with the launcher too), and no longer: a group id is
        a pid, and the system reuses pids."""
        self.reaper.flush()  # groups that ended at the last poll, if no job started since
        for pgid in list(self.lingering):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                self.lingering.discard(pgid)
                self.reaper.forget(pgid)
            except PermissionError:  # the id now belongs to someone else's group
                self.lingering.discard(pgid)
                self.reaper.forget(pgid)

    def _result(self, run: _Running, rc: int, now: float) -> ProcessResult:
        outcome = run.kill_reason or "exit"
        result = None
        if run.spec.result_path:
            try:
                result = json.loads(Path(run.spec.result_path).read_text())
            except (OSError, ValueError):
                result = None
        tail = read_tail(run.out_path) if (rc != 0 or outcome != "exit") else ""
        return ProcessResult(run.spec.job_id, rc, outcome, now - run.start, tail=tail, result=result,
                             message=run.kill_message)

    def next_deadline(self) -> float | None:
        timed = [self.running[j] for j in self._timed]
        times = [r.deadline for r in timed if r.deadline and not r.kill_reason]
        times += [r.term_time + KILL_GRACE_S for r in timed if r.term_time and not r.killed_hard]
        times += [s.deadline for s in self.starting.values() if s.deadline is not None]
        return min(times) if times else None

    def kill_all(self, reason: str, message: str = "") -> None:
        for job_id in [*self.running, *self.starting]:
            self.kill(job_id, reason, message)

    def shutdown(self, grace_s: float = 1.5) -> None:
        """Stop every job (SIGTERM, SIGKILL after the grace), then the watchdog."""
        self.kill_all("killed", "launcher shut down")
        while self._spawners:  # after the starts under way: poll() takes those in and kills them
            self._spawners.popitem()[1].close()
        while self._retired:
            self._retired.pop()._thread.join()
        self._notify = None
        deadline = time.monotonic() + grace_s
        while (self.running or self._started) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.01)
        self.reaper.close()  # kills what is left
        if self._null_fd >= 0:
            os.close(self._null_fd)
            self._null_fd = -1
