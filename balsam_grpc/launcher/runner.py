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

import json
import os
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balsam_grpc.core.confined import open_dir_inside, open_private, write_private
from balsam_grpc.core.jobenv import job_safe
from balsam_grpc.launcher.launch_commands import _ranges
from balsam_grpc.launcher.process_spec import ProcessSpec
from balsam_grpc.launcher.reaper import Reaper
from balsam_grpc.launcher.spawn import Child, environment_entries, spawn

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
    """A thread bound to one CPU set that starts the jobs bound to it: a child inherits
    the CPU mask of the thread that forks it. Binding the launcher's own thread for each
    start (and back after) made the kernel move it onto the job's CPUs first, and it waited
    there, holding the GIL, behind what ran on them: 27-57 % of the launcher's time with
    2 slots of one CPU each. This thread sits on its CPUs already and sleeps between starts."""

    def __init__(self, cpus: tuple[int, ...]) -> None:
        self.cpus = cpus
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._call: Callable[[], Child | subprocess.Popen] | None = None
        self._out: tuple[Child | subprocess.Popen | None, BaseException | None] = (None, None)
        self._unbound: tuple[int, str] | None = None  # why this thread could not bind
        self._thread = threading.Thread(target=self._serve, name=f"spawn on CPUs {_ranges(cpus)}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            os.sched_setaffinity(0, self.cpus)  # this thread only
        except OSError as exc:
            self._unbound = (exc.errno, f"cannot bind to CPUs {_ranges(self.cpus)}: {exc.strerror}")
        while True:
            self._go.acquire()
            call = self._call
            if call is None:
                return
            try:
                if self._unbound is not None:
                    raise OSError(*self._unbound)
                self._out = (call(), None)
            except BaseException as exc:  # handed to the caller, raised there
                self._out = (None, exc)
            self._done.release()

    def run(self, call: Callable[[], Child | subprocess.Popen]) -> Child | subprocess.Popen:
        """`call()` on this thread, the caller waiting (without the GIL) for its outcome."""
        self._call = call
        self._go.release()
        self._done.acquire()
        (child, exc), self._out, self._call = self._out, (None, None), None
        if exc is not None:
            raise exc
        assert child is not None
        return child

    def close(self) -> None:
        self._call = None
        self._go.release()
        self._thread.join()


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

    def __len__(self) -> int:
        return len(self.running)

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
                self._spawners.popitem(last=False)[1].close()
            spawner = self._spawners[cpus] = _BoundSpawner(cpus)
        else:
            self._spawners.move_to_end(cpus)
        return spawner

    def start(self, spec: ProcessSpec, now: float | None = None) -> ProcessResult | None:
        """Start the job; a ProcessResult (outcome spawn_error) when it could not start."""
        now = time.monotonic() if now is None else now
        try:
            dir_fd, workdir = open_dir_inside(spec.cwd, spec.root or "/", what="workdir")
        except (ValueError, OSError) as exc:  # PathEscape is a ValueError, as a NUL in the path is
            # Nothing is written: the path may lead anywhere.
            msg = f"refused to run job {spec.job_id}: {exc}"
            return ProcessResult(spec.job_id, None, "spawn_error", 0.0, tail=msg, message=msg)
        out_path = os.path.join(workdir, spec.out_name)
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
                try:
                    if bind:
                        # Bound as taskset would bind it, without a second program to exec
                        # for every job.
                        proc = self._spawner(bind).run(
                            lambda: spawn(spec.argv, cwd=cwd, env=env, stdin=stdin, stdout=out))
                    else:
                        proc = spawn(spec.argv, cwd=cwd, env=env, stdin=stdin, stdout=out)
                finally:
                    os.close(out)
            except (ValueError, OSError) as exc:  # ValueError: PathEscape, or what exec cannot take (`=` in a name, NUL)
                msg = f"could not start {spec.argv[0]!r} in {workdir}: {exc}"
                try:
                    with os.fdopen(open_private(spec.out_name, append=True, dir_fd=dir_fd), "a") as fh:
                        fh.write(msg + "\n")
                except OSError:
                    pass
                return ProcessResult(spec.job_id, None, "spawn_error", 0.0, tail=msg, message=msg)
        finally:
            os.close(dir_fd)
        self.reaper.watch(proc.pid)  # its own session: the group id is its pid
        deadline = now + spec.timeout_s if spec.timeout_s else None
        self.running[spec.job_id] = _Running(spec, proc, now, deadline, out_path=out_path)
        self._by_pid[proc.pid] = spec.job_id
        if deadline is not None:
            self._timed.add(spec.job_id)
        return None

    def _devnull(self) -> int:
        """One /dev/null for every job's stdin (not inherited: the child gets it as fd 0)."""
        if self._null_fd < 0:
            self._null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        return self._null_fd

    def kill(self, job_id: int, reason: str = "killed", message: str = "", now: float | None = None) -> bool:
        """SIGTERM the job's process group (SIGKILL follows in poll). False if not running here."""
        run = self.running.get(job_id)
        if run is None:
            return False
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
        self._forget_ended_groups()
        done: list[ProcessResult] = []
        if not self._reap_ended(done, now):
            for job_id, run in list(self.running.items()):
                rc = run.proc.poll()
                if rc is not None:
                    done.append(self._ended(job_id, run, rc, now))
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
        return min(times) if times else None

    def kill_all(self, reason: str, message: str = "") -> None:
        for job_id in list(self.running):
            self.kill(job_id, reason, message)

    def shutdown(self, grace_s: float = 1.5) -> None:
        """Stop every job (SIGTERM, SIGKILL after the grace), then the watchdog."""
        self.kill_all("killed", "launcher shut down")
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.01)
        self.reaper.close()  # kills what is left
        while self._spawners:
            self._spawners.popitem()[1].close()
        if self._null_fd >= 0:
            os.close(self._null_fd)
            self._null_fd = -1
